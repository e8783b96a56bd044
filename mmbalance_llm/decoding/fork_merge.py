"""Fork-Merge Decoding (FMD; Jung et al., arXiv 2505.20873): a training-free, inference-time debiasing for
audio-visual LLMs.

Prefill (the multimodal prompt) runs in two phases inside the language model:

* **fork** -- the first ``fork_layers`` decoder layers run twice, batched as ``2B`` rows: an *audio-only* pass in
  which the visual (image/video) tokens are masked out of attention, and a *visual-only* pass in which the audio
  tokens are masked out (text keeps attending to text in both; every token keeps its own key, so no row is empty);
* **merge** -- at layer ``L_f`` the two hidden-state streams become one: an audio token keeps its audio-pass
  state, a visual token its visual-pass state, and a text token gets ``a * h_audio + (1 - a) * h_visual``. The
  weight ``a`` is the merge rule: ``"attention"`` (default; token-wise, from the last fork layer's attention:
  ``a = s_a / (s_a + s_v)``, ``s_a`` the attention mass the token puts on audio keys in the audio pass, ``s_v``
  the mass on visual keys in the visual pass, heads averaged), ``"average"`` (``a = 0.5``), a float, or a
  callable ``rule(info) -> Tensor[B, T]``;
* the remaining layers run jointly on the merged states.

The key/value cache of the fork layers is merged with the same per-token weights, so decode steps (and, in
teacher-forced scoring, the answer tokens) run as plain decoding on top of the merged prompt. A forward without
a cache over ``prompt + continuation`` (``generate(use_cache=False)``, option scoring) is split at the prompt
length and computed the same way, so cached and uncached generation agree.

No official code could be found here; this follows the paper's description (token-wise fusion,
attention-guided merge). Masking is done in attention rather than by zeroing the other modality's input
embeddings; the paper's default ``L_fork`` could not be read either, so the default is a quarter of the decoder
layers (at least one). Modality token positions come from :mod:`mmbalance_llm.models.modality_map`.

Use::

    from mmbalance_llm.decoding import fork_merge
    with fork_merge(model, fork_layers=1, merge="attention"):
        out = model.generate(**batch, max_new_tokens=8)   # prefill forks/merges, decode steps run normally
    # on exit every patch is removed: the model is bit-identical to before
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from mmbalance_llm.models.modality_map import MODALITY_IDS, get_modality_map, token_modality_ids

IGNORE = -100
MERGE_RULES = ("attention", "average")
MASK_MODES = ("attention", "zero")


@dataclass
class FMDConfig:
    """Fork-Merge Decoding settings."""

    fork_layers: int | None = field(default=None, metadata={
        "help": "decoder layers run as separate audio-only / visual-only passes before the merge (L_fork); "
                "None = a quarter of the decoder layers, at least 1; 0 = plain decoding"})
    merge: Any = field(default="attention", metadata={
        "help": "merge rule for text tokens: 'attention' (token-wise weights from the last fork layer's attention), "
                "'average' (0.5), a float weight on the audio pass, or a callable info -> Tensor[B, T]"})
    mask: str = field(default="attention", metadata={
        "help": "how a fork hides the other modality: 'attention' (its keys masked out) or 'zero' (its input "
                "embeddings zeroed, positions still attended, closer to the paper's input masking)"})
    groups: tuple | None = field(default=None, metadata={
        "help": "the two modality groups that fork, e.g. (('audio',), ('image', 'video')); None = audio vs visual "
                "when the architecture has audio, else its two non-text modalities"})


def default_groups(modalities: tuple) -> tuple:
    """Audio vs visual (image + video) when the architecture takes audio, else its first two modalities."""
    visual = tuple(m for m in modalities if m in ("image", "video"))
    if "audio" in modalities and visual:
        return (("audio",), visual)
    if len(modalities) >= 2:
        return ((modalities[0],), (modalities[1],))
    raise ValueError(f"fork-merge decoding needs two non-text modalities; the architecture has {list(modalities)}")


def _decoder(model):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner = getattr(base, "model", base)
    lm = getattr(inner, "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise ValueError(f"fork-merge decoding: cannot find the decoder of {type(base).__name__} "
                         "(expected model.language_model.layers)")
    return base, lm


def _repeat_batch(x, B: int):
    """Two copies along the batch dimension: dim 0 (cos/sin [B, T, d], position ids [B, T] in transformers 5),
    else dim 1 (position ids [3|4, B, T])."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.shape[0] == B:
        return torch.cat([x, x], 0)
    if x.ndim >= 3 and x.shape[1] == B:
        return torch.cat([x, x], 1)
    return x


class ForkMerge:
    """Context manager applying FMD to an HF MLLM; see the module docstring. ``with ForkMerge(model) as fmd``."""

    def __init__(self, model, fork_layers: int | None = None, merge: Any = "attention", groups: tuple | None = None,
                 mask: str = "attention"):
        self.model = model
        self.base, self.lm = _decoder(model)
        mmap = get_modality_map(self.base)
        n = len(self.lm.layers)
        self.fork_layers = max(1, n // 4) if fork_layers is None else int(fork_layers)
        if not 0 <= self.fork_layers < n:
            raise ValueError(f"fork_layers must be in 0..{n - 1} (the decoder has {n} layers); got {fork_layers}")
        if not (callable(merge) or isinstance(merge, (int, float)) or merge in MERGE_RULES):
            raise ValueError(f"merge: unknown rule {merge!r}; choose from {', '.join(MERGE_RULES)}, "
                             "a float or a callable")
        self.merge = merge
        if mask not in MASK_MODES:
            raise ValueError(f"mask: unknown mode {mask!r}; choose from {', '.join(MASK_MODES)}")
        self.mask = mask
        self.groups = tuple(tuple(g) for g in (groups or default_groups(mmap.modalities)))
        if len(self.groups) != 2 or any(m not in mmap.modalities for g in self.groups for m in g):
            raise ValueError(f"groups must be two groups of {list(mmap.modalities)}; got {groups}")
        impl = getattr(self.lm.config, "_attn_implementation", None) or "eager"
        if "flash" in str(impl):
            raise ValueError(f"fork-merge decoding needs 'eager' or 'sdpa' attention (masks per fork); got {impl!r}")
        self.prompt_length: int | None = None  # set per call from labels / by generate; None = whole input
        self._ids = self._valid = None
        self._state: dict | None = None
        self._patched: list = []
        self.last_merge_weights: torch.Tensor | None = None  # [B, T] weight on the audio-group pass, last prefill

    @classmethod
    def from_config(cls, model, config: FMDConfig) -> "ForkMerge":
        return cls(model, fork_layers=config.fork_layers, merge=config.merge, groups=config.groups, mask=config.mask)

    # ------------------------------------------------------------------ install / remove
    def __enter__(self):
        try:
            # a patched forward rather than a pre-hook: peft's tuners call ``model.forward`` directly (no hooks)
            self._patch(self.base, "forward", self._top_forward)
            if self.fork_layers == 0:
                return self  # plain decoding: nothing else to patch
            self._lm_orig = self._patch(self.lm, "forward", lambda orig: self._lm_forward)
            for i in range(self.fork_layers):
                self._patch(self.lm.layers[i], "forward", lambda orig, i=i: self._layer_forward(i, orig))
            self._patch(self.base, "generate", self._generate)
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc):
        for obj, name, prev in reversed(self._patched):
            if prev is None:
                del obj.__dict__[name]  # the class attribute is what remains: bit-identical to before
            else:
                obj.__dict__[name] = prev  # e.g. accelerate's device-map hook, put back as it was
        self._patched, self._state = [], None
        return False

    def _patch(self, obj, name, make):
        """Install ``make(previous)`` as ``obj.<name>``; returns the previous callable. A previous instance
        attribute (accelerate's device-map hooks set one on ``forward``) is wrapped and restored on exit."""
        prev = obj.__dict__.get(name)
        if getattr(prev, "_mmbalance_fmd", False):
            raise RuntimeError(f"fork-merge decoding: {type(obj).__name__}.{name} is already patched (nested FMD?)")
        orig = prev if prev is not None else getattr(type(obj), name).__get__(obj)
        fn = make(orig)
        try:
            fn._mmbalance_fmd = True
        except AttributeError:  # a bound method: wrap it so the marker can be set
            fn = functools.wraps(orig)(lambda *a, _f=fn, **k: _f(*a, **k))
            fn._mmbalance_fmd = True
        obj.__dict__[name] = fn
        self._patched.append((obj, name, prev))
        return orig

    # ------------------------------------------------------------------ per-call inputs
    def _top_forward(self, orig):
        @functools.wraps(orig)  # generate() checks its kwargs against this signature
        def forward(*args, **kwargs):
            self._capture_batch(args, kwargs)
            return orig(*args, **kwargs)
        return forward

    def _capture_batch(self, args, kwargs):
        """Top-level forward: remember token modalities, validity and (from labels) the prompt length."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None and kwargs.get("mm_token_type_ids") is None:
            return  # an embeddings-only call (e.g. attribution passes): keep what the last full call said
        self._ids = token_modality_ids({"input_ids": ids, "mm_token_type_ids": kwargs.get("mm_token_type_ids")},
                                       self.base)
        am = kwargs.get("attention_mask")
        self._valid = torch.as_tensor(am).bool() if isinstance(am, torch.Tensor) and am.ndim == 2 else None
        labels = kwargs.get("labels")
        if self._in_generate:
            return  # generate() set the prompt length
        self.prompt_length = None  # an unlabelled forward forks its whole input
        if labels is not None:
            ans = labels != IGNORE
            if bool(ans.any(1).all()):
                first = ans.float().argmax(1)
                if bool((first != first[0]).any()):
                    raise ValueError("fork-merge decoding needs the rows of a batch to start their answers at one "
                                     "position; "
                                     f"this batch's answers start at {sorted(set(first.tolist()))} (batch rows with "
                                     "equal prompt lengths, or use batch size 1)")
                self.prompt_length = int(first[0])

    _in_generate = False

    def _generate(self, orig):
        def generate(*args, **kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            saved, self._in_generate = self.prompt_length, True
            self.prompt_length = int(ids.shape[1]) if ids is not None else None
            try:
                return orig(*args, **kwargs)
            finally:
                self.prompt_length, self._in_generate = saved, False
        return generate

    # ------------------------------------------------------------------ language model forward
    def _token_map(self, B: int, T: int):
        """(modality ids, validity) for a decoder call of shape [B, T]: those of the last top-level call, or its
        single row repeated (attribution re-scores one sample's rows in bulk); None when they do not fit."""
        ids, valid = self._ids, self._valid
        if ids is None or ids.shape[1] != T or ids.shape[0] not in (1, B):
            return None
        if ids.shape[0] != B:
            ids = ids.expand(B, T)
            valid = None if valid is None else valid.expand(B, T)
        return ids, valid

    def _lm_forward(self, *args, **kw):
        orig = self._lm_orig
        emb = kw.get("inputs_embeds")
        cache = kw.get("cache", kw.get("past_key_values"))
        past = cache.get_seq_length() if cache is not None else 0
        tmap = None if emb is None or past > 0 else self._token_map(*emb.shape[:2])
        if tmap is None:
            return orig(*args, **kw)  # decode step, text-only call or a call FMD has no token map for
        ids, valid = tmap
        P = self.prompt_length
        T = emb.shape[1]
        if P is None or P >= T or P <= 0:
            return self._prefill(orig, kw, ids, valid)
        # prompt + continuation without a cache: fork/merge the prompt, then run the rest as decode steps
        from transformers import DynamicCache

        cache_key = "cache" if "cache" in kw or "past_key_values" not in kw else "past_key_values"
        use_cache = kw.get("use_cache")
        cache = cache if cache is not None else DynamicCache(config=self.lm.config)
        am = kw.get("attention_mask")
        if am is not None and not (isinstance(am, torch.Tensor) and am.ndim == 2):
            raise ValueError("fork-merge decoding: a prompt+continuation forward needs a 2-D attention_mask")
        head = dict(kw, inputs_embeds=emb[:, :P], use_cache=True, **{cache_key: cache})
        tail = dict(kw, inputs_embeds=emb[:, P:], use_cache=True, **{cache_key: cache})
        if am is not None:
            head["attention_mask"] = am[:, :P]
        pid = kw.get("position_ids")
        if isinstance(pid, torch.Tensor):
            head["position_ids"], tail["position_ids"] = pid[..., :P], pid[..., P:]
        out1 = self._prefill(orig, head, ids[:, :P], None if valid is None else valid[:, :P])
        out2 = orig(**tail)
        out2.last_hidden_state = torch.cat([out1.last_hidden_state, out2.last_hidden_state], 1)
        if not use_cache and "cache" in out2:
            out2["cache"] = None
        return out2

    def _prefill(self, orig, kw, ids, valid):
        emb = kw["inputs_embeds"]
        B, T = emb.shape[:2]
        grp = [torch.zeros(B, T, dtype=torch.bool, device=emb.device) for _ in range(2)]
        for g, mods in zip(grp, self.groups):
            for m in mods:
                g |= ids.to(emb.device) == MODALITY_IDS[m]
        if not (grp[0].any() or grp[1].any()):
            return orig(**kw)  # no media: both forks would be the plain pass
        am = kw.get("attention_mask")
        valid = am.bool() if isinstance(am, torch.Tensor) and am.ndim == 2 else valid
        valid = torch.ones(B, T, dtype=torch.bool, device=emb.device) if valid is None else valid.to(emb.device)
        valid = valid[:, -T:]
        self._state = {"B": B, "T": T, "groups": grp, "valid": valid, "attn": None,
                       "mask": self._fork_mask(grp, valid, emb.dtype, hide_keys=self.mask == "attention")}
        try:
            return orig(**kw)
        finally:
            self._state = None

    @staticmethod
    def _fork_mask(grp, valid, dtype, hide_keys: bool = True):
        """[2B, 1, T, T] additive mask: causal, padding keys out, the *other* group's keys out (own key kept)."""
        B, T = valid.shape
        dev = valid.device
        causal = torch.ones(T, T, dtype=torch.bool, device=dev).tril()
        eye = torch.eye(T, dtype=torch.bool, device=dev)
        allowed = []
        for other in (grp[1], grp[0]):  # fork 0 (group 0 only) hides group 1's keys, and vice versa
            keys = valid & ~other if hide_keys else valid  # [B, T]
            allowed.append((causal[None] & keys[:, None, :]) | eye[None])
        allowed = torch.cat(allowed, 0)[:, None]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=dev)
        return mask.masked_fill(~allowed, torch.finfo(dtype).min)

    # ------------------------------------------------------------------ decoder layers
    def _layer_forward(self, i: int, orig: Callable):
        last = i == self.fork_layers - 1

        def forward(hidden_states, *args, **kw):
            st = self._state
            if st is None:
                return orig(hidden_states, *args, **kw)
            B = st["B"]
            if i == 0:
                if self.mask == "zero":  # each fork sees the other group's positions with zero embeddings
                    ga, gv = st["groups"]
                    hidden_states = torch.cat([hidden_states.masked_fill(gv[..., None], 0),
                                               hidden_states.masked_fill(ga[..., None], 0)], 0)
                else:
                    hidden_states = torch.cat([hidden_states, hidden_states], 0)
            kw["attention_mask"] = st["mask"]
            if "pos2" not in st:
                pe = kw.get("position_embeddings")
                st["pos2"] = tuple(_repeat_batch(t, B) for t in pe) if pe is not None else None
                st["pid2"] = _repeat_batch(kw.get("position_ids"), B)
            if kw.get("position_embeddings") is not None:
                kw["position_embeddings"] = st["pos2"]
            if isinstance(kw.get("position_ids"), torch.Tensor):
                kw["position_ids"] = st["pid2"]
            if not last:
                return orig(hidden_states, *args, **kw)
            out = self._run_capturing_attention(orig, hidden_states, args, kw) if self._needs_attention() \
                else orig(hidden_states, *args, **kw)
            return self._merge(out, kw.get("cache", kw.get("past_key_values")))
        return forward

    def _needs_attention(self) -> bool:
        return self.merge == "attention" or callable(self.merge)

    def _run_capturing_attention(self, orig, hidden_states, args, kw):
        """Run the last fork layer with eager attention so its attention probabilities can be read."""
        attn = self.lm.layers[self.fork_layers - 1].self_attn
        cfg = attn.config
        saved = cfg._attn_implementation
        h = attn.register_forward_hook(lambda mod, a, out: self._state.__setitem__("attn", out[1]))
        cfg._attn_implementation = "eager"
        try:
            return orig(hidden_states, *args, **kw)
        finally:
            cfg._attn_implementation = saved
            h.remove()

    def _merge_weights(self) -> torch.Tensor:
        st = self._state
        B, (ga, gv) = st["B"], st["groups"]
        if self.merge == "average":
            a = torch.full(ga.shape, 0.5)
        elif isinstance(self.merge, (int, float)):
            a = torch.full(ga.shape, float(self.merge))
        else:
            p = st["attn"]
            if p is None:
                raise RuntimeError("fork-merge decoding: no attention probabilities were captured at the merge layer")
            p = p.float().mean(1)  # [2B, T, T], heads averaged
            s_a = (p[:B] * ga[:, None, :]).sum(-1)
            s_v = (p[B:] * gv[:, None, :]).sum(-1)
            tot = s_a + s_v
            a = torch.where(tot > 0, s_a / tot.clamp_min(1e-30), torch.full_like(tot, 0.5))
            if callable(self.merge):
                a = self.merge({"attention_audio_pass": p[:B], "attention_visual_pass": p[B:], "groups": self.groups,
                                "group_masks": (ga, gv), "attention_weight": a})
        a = a.to(ga.device).float()
        a = torch.where(ga, torch.ones_like(a), torch.where(gv, torch.zeros_like(a), a))
        self.last_merge_weights = a.detach().cpu()
        return a

    def _merge(self, out, cache):
        B = self._state["B"]
        a = self._merge_weights()
        w = a.to(out.dtype)[..., None]
        merged = w * out[:B] + (1 - w) * out[B:]
        if cache is not None:  # the fork layers' K/V for decode steps: the same per-token convex combination
            wk = a.to(out.dtype)[:, None, :, None]
            for li in range(self.fork_layers):
                layer = cache.layers[li]
                layer.keys = wk * layer.keys[:B] + (1 - wk) * layer.keys[B:]
                layer.values = wk * layer.values[:B] + (1 - wk) * layer.values[B:]
        return merged


def fork_merge(model, fork_layers: int | None = None, merge: Any = "attention", groups: tuple | None = None,
               mask: str = "attention") -> ForkMerge:
    """``with fork_merge(model, fork_layers, merge):`` -- apply Fork-Merge Decoding inside the block."""
    return ForkMerge(model, fork_layers=fork_layers, merge=merge, groups=groups, mask=mask)


def decoding_context(model, decoding: str = "plain", **fmd_kwargs):
    """A context for ``decoding`` in ('plain', 'fmd'): :func:`contextlib.nullcontext` or :func:`fork_merge`."""
    import contextlib

    if decoding == "plain":
        return contextlib.nullcontext()
    if decoding == "fmd":
        return fork_merge(model, **fmd_kwargs)
    raise ValueError(f"decoding: unknown {decoding!r}; choose plain or fmd")


def prompt_length_groups(encodings: list, batch_size: int) -> list:
    """Index chunks (at most ``batch_size``) whose encodings' answers start at the same position, for scoring
    under FMD (the prompt is forked, the answer tokens run as decode steps)."""
    by_len: dict = {}
    for i, e in enumerate(encodings):
        ans = (torch.as_tensor(e["labels"]) != IGNORE).nonzero()
        by_len.setdefault(int(ans[0]) if len(ans) else -1, []).append(i)
    return [idx[s:s + batch_size] for idx in by_len.values() for s in range(0, len(idx), batch_size)]
