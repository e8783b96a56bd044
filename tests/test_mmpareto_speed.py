"""MMPareto's flat exact mode gives bitwise the gradients of the per-tensor implementation it replaced."""
import pytest
import torch
import torch.nn.functional as F

from mmbalance_llm.balance import get_method
from mmbalance_llm.balance._objective import flatten, linear_surrogate
from mmbalance_llm.balance.mmpareto import flat_surrogate, integrate, integrate_flat
from test_methods_objective import batch_for, conflicting_model, inputs, stub_ctx, tiny_model


def _per_tensor_exact(model, batch, gamma=1.5):
    """The exact mode as it was: per-tensor `integrate` and `linear_surrogate` (rescale 'encoder')."""
    out = model(**inputs(batch, model))
    y, mods = batch["labels"], list(out.features)
    feats = [out.features[m] for m in mods]
    c_mm = torch.autograd.grad(F.cross_entropy(out.logits, y), feats, retain_graph=True)
    c_u = torch.autograd.grad(sum(F.cross_entropy(out.unimodal_logits[m], y) for m in mods), feats, retain_graph=True)
    per = {m: [p for _, p in model.modality_parameters(m) if p.requires_grad] for m in mods}
    params = [p for m in mods for p in per[m]]
    g_mm = torch.autograd.grad(feats, params, grad_outputs=c_mm, retain_graph=True)
    g_u = torch.autograd.grad(feats, params, grad_outputs=c_u, retain_graph=True)
    combined, start = [], 0
    for m in mods:
        k = len(per[m])
        combined += integrate(list(g_mm[start:start + k]), list(g_u[start:start + k]), gamma)[0]
        start += k
    head = model.fuse({m: h.detach() for m, h in out.features.items()})
    loss = F.cross_entropy(head.logits, y) + sum(F.cross_entropy(z, y) for z in head.unimodal_logits.values())
    return loss + linear_surrogate(params, combined)


def _grads(model, loss, scale=1.0):
    model.zero_grad(set_to_none=True)
    (loss * scale).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", ["conflict", "random", "transformer"])
def test_flat_exact_mode_is_bitwise_the_per_tensor_one(case):
    if case == "conflict":
        model = conflicting_model(0.5)
        batch = batch_for(model)
        batch["labels"].zero_()
    elif case == "random":
        model, batch = tiny_model(seed=3), None
        batch = batch_for(model)
    else:
        from mmbalance_llm.models.classifier import MultimodalClassifier, MultimodalClassifierConfig

        torch.manual_seed(0)
        model = MultimodalClassifier(MultimodalClassifierConfig(
            modalities=["a", "b"], input_shapes={"a": [4, 6], "b": [4, 6]}, num_classes=3, encoder="transformer",
            feature_dim=8, hidden_dim=8, num_layers=1, num_heads=2))
        gen = torch.Generator().manual_seed(1)
        batch = {m: torch.randn(8, 4, 6, generator=gen) for m in ("a", "b")}
        batch["labels"] = torch.randint(0, 3, (8,), generator=gen)
    bal = get_method("mmpareto")
    bal.setup(stub_ctx(model), model)
    for scale in (1.0, 0.25):  # 0.25: gradient accumulation divides the loss
        loss, logs = bal.loss(model, batch, model(**inputs(batch, model)))
        new = _grads(model, loss, scale)
        old = _grads(model, _per_tensor_exact(model, batch), scale)
        assert new.keys() == old.keys()
        for name in new:
            assert torch.equal(new[name], old[name]), name
    if case == "conflict":
        assert logs["pareto_conflict_a"] == 1.0


def test_integrate_flat_and_flat_surrogate_match_their_per_tensor_forms():
    gen = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (4,), (2, 2, 2)]
    for sign in (1.0, -1.0):  # agreeing, then conflicting gradients (the min-norm branch and the rescale)
        g_mm = [torch.randn(s, generator=gen) for s in shapes]
        g_u = [sign * g + 0.3 * torch.randn(s, generator=gen) for g, s in zip(g_mm, shapes)]
        ref, conflict, w = integrate(g_mm, g_u, 1.5)
        new, conflict2, w2 = integrate_flat(flatten(g_mm), flatten(g_u), 1.5)
        assert (conflict, w) == (conflict2, w2) and conflict == (sign < 0)
        assert torch.equal(new, flatten(ref))
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in shapes]
    grads = [torch.randn(s, generator=gen) for s in shapes]
    (0.5 * linear_surrogate(params, grads)).backward()
    old = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    (0.5 * flat_surrogate(params, flatten(grads))).backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, old))
    assert float(flat_surrogate(params, flatten(grads)).detach()) == 0.0
