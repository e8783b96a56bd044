"""Balance metrics: macro-F1, exact Shapley (efficiency, symmetry, null player), imbalance, OGM rule."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mmbalance_llm.balance.ogm_ge import ogm_coefficients
from mmbalance_llm.eval.metrics import accuracy, imbalance, macro_f1, shapley_values, subsets


def test_macro_f1_matches_hand_computation():
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    preds = torch.tensor([0, 1, 1, 1, 2, 0])
    # class 0: tp1 fp1 fn1 -> 0.5; class 1: tp2 fp1 fn0 -> 0.8; class 2: tp1 fp0 fn1 -> 2/3
    assert macro_f1(preds, labels, 4) == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    assert accuracy(preds, labels) == pytest.approx(4 / 6)


def test_shapley_known_game():
    # v: a alone 0.6, b alone 0.2, both 0.9, none 0.1
    v = {frozenset(): 0.1, frozenset("a"): 0.6, frozenset("b"): 0.2, frozenset("ab"): 0.9}
    phi = shapley_values(v, ["a", "b"])
    assert phi["a"] == pytest.approx(0.5 * (0.5 + 0.7))
    assert phi["b"] == pytest.approx(0.5 * (0.1 + 0.3))
    assert imbalance(phi) == pytest.approx(abs(phi["a"] - phi["b"]) / (phi["a"] + phi["b"]))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=8, max_size=8))
def test_shapley_efficiency_and_null_player(values):
    mods = ["a", "b", "c"]
    v = dict(zip(subsets(mods), values))
    phi = shapley_values(v, mods)
    assert sum(phi.values()) == pytest.approx(v[frozenset(mods)] - v[frozenset()], abs=1e-9)
    # make 'c' a null player: v(S + c) = v(S)
    for s in subsets(["a", "b"]):
        v[s | {"c"}] = v[s]
    assert shapley_values(v, mods)["c"] == pytest.approx(0.0, abs=1e-12)


def test_imbalance_bounds():
    assert imbalance({"a": 0.3, "b": 0.3, "c": 0.3}) == 0.0
    assert imbalance({"a": 0.5, "b": 0.0}) == pytest.approx(1.0)
    assert imbalance({"a": 0.6, "b": 0.0, "c": 0.0}) == pytest.approx(1.0)
    assert imbalance({"a": 0.4}) == 0.0


@pytest.mark.parametrize("scores", [[30.0, 10.0], [10.0, 30.0], [5.0, 20.0, 8.0], [12.0, 12.0]])
def test_ogm_coefficient_below_one_only_for_the_dominant_modality(scores):
    s = torch.tensor(scores)
    k = ogm_coefficients(s, alpha=0.8)
    for m in range(len(s)):
        others = (s.sum() - s[m]) / (len(s) - 1)
        if s[m] > others:
            assert k[m] < 1 and k[m] == pytest.approx(1 - torch.tanh(0.8 * s[m] / others).item())
        else:
            assert k[m] == 1
    assert torch.equal(ogm_coefficients(s, alpha=0.0), torch.ones_like(s))
