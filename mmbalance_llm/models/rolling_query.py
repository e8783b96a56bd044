"""RollingQ's rotation (Ni et al., ICML 2025) and a wrapper that adds it to Hugging Face attention modules.

Math (shared with `balance/rollingq.py`):

- `balanced_target(key_means, alignment, sigma, norm)`: t = sum_m w_m mu_m / |mu_m|, rescaled to `norm`,
  with w = softmax(-2 sigma a). For M = 2 this is exactly the paper's alpha = (1 + tanh(-sigma AIR)) / 2
  with AIR = a_1 - a_2 (softmax of two logits is a logistic of their difference); sigma = 0 gives equal
  weights. M > 2 is the natural generalisation: the more a modality's keys align with the query, the less
  weight it gets in the target.
- `rotation_to(q, t, method)`: an orthogonal R with R q^ = t^ exactly. `"svd"` is the paper's U V^T from
  the SVD of t^ q^T (last column of U negated if det < 0; arbitrary on the orthogonal complement);
  `"plane"` is the minimal rotation in span(q, t), identity on its complement.

HF wrapper: `add_rolling_query(model, ...)` hooks every chosen decoder layer's `q_proj` and `k_proj`
(the LLaMA / Qwen / Mistral layout: `self_attn.q_proj`, `self_attn.k_proj`, `config.num_attention_heads`,
`num_key_value_heads`). The rotation acts on the `q_proj` output at the chosen query positions, per head,
before RoPE (the projection's output is what a forward hook can reach); the statistic uses the same
pre-RoPE queries and keys. Modality spans come from a [B, T] modality-id tensor: given explicitly
(`handle.set_modality_ids`), or read by a pre-hook on the top model from `mm_token_type_ids` or from
`input_ids` with a {modality: token id} map. `handle.remove()` restores the model exactly.
Record statistics with full forward passes (no KV cache): during cached decoding a hook sees only the
new token's key. The handle is not part of the model, so move it with `handle.to(device)` if you like;
the rotation is moved to the activations' device on use anyway.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


# -- rotation math ---------------------------------------------------------------------------------
def balanced_target(key_means: torch.Tensor, alignment: torch.Tensor, sigma: float, norm) -> torch.Tensor:
    """key_means [M, d], alignment [M] (a_m) -> target [d] with norm `norm`."""
    w = torch.softmax(-2.0 * float(sigma) * alignment.double(), dim=0)
    dirs = key_means.double() / key_means.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    t = (w[:, None] * dirs).sum(0)
    return t / t.norm().clamp_min(1e-12) * float(norm)


def rotation_to(q: torch.Tensor, t: torch.Tensor, method: str = "svd") -> torch.Tensor:
    """Orthogonal R (float64, det +1) with R q/|q| = t/|t|."""
    qh = q.double() / q.double().norm().clamp_min(1e-12)
    th = t.double() / t.double().norm().clamp_min(1e-12)
    d = qh.numel()
    if method == "svd":
        u, _, vh = torch.linalg.svd(torch.outer(th, qh))
        if torch.det(u @ vh) < 0:
            u = u.clone()
            u[:, -1] = -u[:, -1]
        return u @ vh  # u0 v0^T = t^ q^T / 1 fixes R q^ = t^; the negated column is orthogonal to both
    if method == "plane":
        cos = torch.clamp(torch.dot(qh, th), -1.0, 1.0)
        w = th - cos * qh
        if w.norm() < 1e-12:  # already aligned (or exactly opposite: any plane works; take a fixed one)
            if cos > 0:
                return torch.eye(d, dtype=torch.float64)
            w = torch.zeros(d, dtype=torch.float64)
            w[int(torch.argmin(qh.abs()))] = 1.0
            w = w - torch.dot(w, qh) * qh
        w = w / w.norm()
        sin = torch.sqrt(torch.clamp(1 - cos ** 2, min=0.0))
        eye = torch.eye(d, dtype=torch.float64)
        return (eye + (cos - 1) * (torch.outer(qh, qh) + torch.outer(w, w))
                + sin * (torch.outer(w, qh) - torch.outer(qh, w)))
    raise ValueError(f"rotation must be 'svd' or 'plane', got {method!r}")


def rotate_from_sums(sums: dict, rotation: torch.Tensor, beta: float, sigma: float, method: str) -> dict:
    """Apply RollingQ to every (layer, head) whose |AIR| > beta, from reduced statistic sums
    (`n`, `cos` [L,H,M], `key_sum` [L,H,M,dh], `query_sum` [L,H,dh]). Updates `rotation` [L,H,dh,dh]
    in place (R <- R_new R) and returns {"air": [L,H], "rotated": [L,H] bool, "angle": [L,H] degrees}."""
    n = sums["n"].clamp_min(1)
    align = sums["cos"] / n
    air = align.max(-1).values - align.min(-1).values
    key_means = sums["key_sum"] / n  # direction only matters, so the per-token normalisation cancels
    q_mean = sums["query_sum"] / n
    L, H = air.shape
    rotated = torch.zeros(L, H, dtype=torch.bool)
    angle = torch.zeros(L, H, dtype=torch.float64)
    for i in range(L):
        for h in range(H):
            if not float(air[i, h]) > beta:
                continue
            target = balanced_target(key_means[i, h], align[i, h], sigma, q_mean[i, h].norm())
            r_new = rotation_to(q_mean[i, h], target, method)
            rotation[i, h] = (r_new.to(rotation.device) @ rotation[i, h].double()).to(rotation.dtype)
            rotated[i, h] = True
            angle[i, h] = math.degrees(math.acos(max(-1.0, min(1.0, float(F.cosine_similarity(
                q_mean[i, h].double(), target, dim=0))))))
    return {"air": air, "rotated": rotated, "angle": angle}


# -- HF wrapper ------------------------------------------------------------------------------------
QUERY_MODES = ("positions", "answer")


def answer_query_mask(labels: Optional[torch.Tensor], attention_mask: Optional[torch.Tensor], t: int,
                      batch: int, device) -> torch.Tensor:
    """[B, T] bool: the positions whose next token is an answer token (``labels[:, t + 1] != -100``), i.e. the
    queries that predict the answer; without labels (generation) the last attended position of each row (the
    one that predicts the next token), or position T-1 during cached decoding."""
    mask = torch.zeros(batch, t, dtype=torch.bool, device=device)
    if labels is not None and labels.shape[-1] == t:
        mask[:, :-1] = labels[:, 1:].to(device) != -100
        return mask
    if attention_mask is not None and attention_mask.shape[-1] == t:
        am = attention_mask.to(device).bool()
        last = t - 1 - am.flip(1).long().argmax(1)
        mask[torch.arange(batch, device=device), last] = True
        return mask
    mask[:, -1] = True
    return mask


def _decoder_layers(model: nn.Module) -> list:
    """The decoder layers that have `self_attn.q_proj` / `k_proj`, in order (the language model only)."""
    layers = []
    for name, mod in model.named_modules():
        attn = getattr(mod, "self_attn", None)
        if attn is not None and hasattr(attn, "q_proj") and hasattr(attn, "k_proj"):
            if any(t in name for t in ("vision", "visual", "audio_tower", "vision_tower")):
                continue
            layers.append((name, attn))
    if not layers:
        raise ValueError("add_rolling_query: found no decoder layer with self_attn.q_proj / k_proj")
    return layers


def _text_config(model):
    cfg = model.config
    return getattr(cfg, "text_config", None) or cfg


class RollingQuery(nn.Module):
    """The state and hooks added by `add_rolling_query`. Not registered in the model (removing it
    leaves the model's state dict untouched); save it with `state_dict()` / `save(path)`."""

    def __init__(self, model, modality_token_ids: Optional[dict], query_positions: Sequence[int],
                 layers: Optional[Sequence[int]], modalities: Optional[Sequence[str]], query_mode: str = "positions"):
        super().__init__()
        if query_mode not in QUERY_MODES:
            raise ValueError(f"add_rolling_query: query_mode must be one of {', '.join(QUERY_MODES)}, got {query_mode!r}")
        self.query_mode = query_mode
        self._query_mask: Optional[torch.Tensor] = None
        tc = _text_config(model)
        self.num_heads = int(tc.num_attention_heads)
        self.num_kv_heads = int(getattr(tc, "num_key_value_heads", None) or self.num_heads)
        self.head_dim = int(getattr(tc, "head_dim", None) or tc.hidden_size // self.num_heads)
        all_layers = _decoder_layers(model)
        idx = list(range(len(all_layers))) if layers is None else [int(i) % len(all_layers) for i in layers]
        self.layer_names = [all_layers[i][0] for i in idx]
        self.modality_token_ids = dict(modality_token_ids or {})
        if modalities is None:
            modalities = ["text"] + [m for m in self.modality_token_ids if m != "text"]
        self.modalities = list(modalities)
        self.query_positions = [int(p) for p in query_positions]
        if not self.query_positions:
            raise ValueError("add_rolling_query: query_positions is empty")
        L, H, dh = len(idx), self.num_heads, self.head_dim
        self.register_buffer("rotation", torch.eye(dh).expand(L, H, dh, dh).clone())
        self.rotation_count = 0
        self.recording = False
        self._sums: dict = {}
        self._modality_ids: Optional[torch.Tensor] = None
        self._explicit = False
        self._keys: dict = {}
        self._handles = [model.register_forward_pre_hook(self._read_ids, with_kwargs=True)]
        for li, (_, attn) in zip(range(L), (all_layers[i] for i in idx)):
            self._handles.append(attn.q_proj.register_forward_hook(self._q_hook(li)))
            self._handles.append(attn.k_proj.register_forward_hook(self._k_hook(li)))

    # modality ids [B, T]: index into self.modalities; -1 = ignored
    def set_modality_ids(self, ids: Optional[torch.Tensor]) -> None:
        """Explicit [B, T] modality ids (index into `modalities`) used for every following forward;
        None returns to reading them from each forward's inputs."""
        self._modality_ids, self._explicit = ids, ids is not None

    def _read_ids(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args and torch.is_tensor(args[0]) else None)
        if self.query_mode == "answer":  # which queries to rotate / record: read from this forward's labels
            ref = ids if ids is not None else kwargs.get("inputs_embeds")
            if ref is not None:
                self._query_mask = answer_query_mask(kwargs.get("labels"), kwargs.get("attention_mask"),
                                                     ref.shape[1], ref.shape[0], ref.device)
        if self._explicit:
            return None
        tt = kwargs.get("mm_token_type_ids")
        if tt is not None:  # 0 text, 1 image, 2 video, 3 audio (the transformers convention)
            names = {0: "text", 1: "image", 2: "video", 3: "audio"}
            out = torch.full_like(tt, -1)
            for code, name in names.items():
                if name in self.modalities:
                    out[tt == code] = self.modalities.index(name)
            self._modality_ids = out
        elif ids is not None:
            out = torch.full_like(ids, self.modalities.index("text") if "text" in self.modalities else -1)
            for name, tok in self.modality_token_ids.items():
                if name in self.modalities:
                    out[ids == tok] = self.modalities.index(name)
            self._modality_ids = out
        return None

    def _positions(self, t: int) -> list:
        return sorted({p % t for p in self.query_positions if -t <= p < t})

    def _query_select(self, b: int, t: int, device) -> torch.Tensor:
        """[B, T] bool of the queries this forward rotates and records."""
        m = self._query_mask
        if self.query_mode == "answer" and m is not None and tuple(m.shape) == (b, t):
            return m.to(device)
        mask = torch.zeros(b, t, dtype=torch.bool, device=device)
        mask[:, self._positions(t)] = True
        return mask

    def _q_hook(self, li: int):
        def hook(module, args, out):
            b, t, _ = out.shape
            sel = self._query_select(b, t, out.device)
            q = out.view(b, t, self.num_heads, self.head_dim)
            if self.rotation_count > 0:
                qp = torch.einsum("hij,nhj->nhi", self.rotation[li].to(device=out.device, dtype=out.dtype), q[sel])
                q = q.clone()
                q[sel] = qp
                out = q.reshape(b, t, -1)
            if self.recording:
                rows = sel.nonzero()[:, 0]
                self._arrive(li, "q", (q[sel].detach(), rows))
            return out
        return hook

    def _k_hook(self, li: int):
        def hook(module, args, out):
            if self.recording:
                b, t, _ = out.shape
                self._arrive(li, "k", out.detach().view(b, t, self.num_kv_heads, self.head_dim))
            return None
        return hook

    def _arrive(self, li: int, kind: str, value: torch.Tensor) -> None:
        # q_proj and k_proj run in either order inside an attention module; record once both are in.
        pending = self._keys.setdefault(li, {})
        pending[kind] = value
        if len(pending) == 2:
            del self._keys[li]
            self._record(li, pending["q"], pending["k"])

    def _record(self, li: int, q_rows: tuple, k: torch.Tensor) -> None:
        """q_rows: (the selected queries [N, H, dh], their batch rows [N]); k: [B, T, Hkv, dh]."""
        q, rows = q_rows
        ids = self._modality_ids
        if ids is None:
            raise RuntimeError("RollingQuery: no modality ids for this forward (call the top model with input_ids "
                               "or mm_token_type_ids, or use set_modality_ids)")
        if ids.shape != k.shape[:2]:
            raise ValueError(f"RollingQuery: modality ids have shape {tuple(ids.shape)}, the keys {tuple(k.shape[:2])}")
        k = k.repeat_interleave(self.num_heads // self.num_kv_heads, dim=2).double()  # [B, T, H, dh]
        q, rows = q.double(), rows.to(k.device)  # [N, H, dh], [N]
        L, H, dh, M = self.rotation.shape[0], self.num_heads, self.head_dim, len(self.modalities)
        if not self._sums:
            z = lambda *s: torch.zeros(*s, dtype=torch.float64)  # noqa: E731
            self._sums = {"n": z(1), "cos": z(L, H, M), "key_sum": z(L, H, M, dh), "query_sum": z(L, H, dh),
                          "count": z(L, H, M)}
        s = self._sums
        ids = ids.to(k.device)
        for j in range(M):
            mask = (ids == j).double()  # [B, T]
            cnt = mask.sum(1)  # [B]
            ksum = torch.einsum("bt,bthd->bhd", mask, k)
            kmean = ksum / cnt.clamp_min(1)[:, None, None]
            have = (cnt > 0).double()[rows]  # a sample without modality j adds nothing to a_j
            cos = F.cosine_similarity(q, kmean[rows], dim=-1)  # [N, H]
            s["cos"][li, :, j] += (cos * have[:, None]).sum(0).cpu()
            s["count"][li, :, j] += have.sum().cpu()
            s["key_sum"][li, :, j] += ksum.sum(0).cpu()
        s["query_sum"][li] += q.sum(0).cpu()
        if li == 0:
            s["n"] += q.shape[0]

    def statistics(self) -> dict:
        """Sums of the recorded passes, in the form `rotate_from_sums` reads (reduce them across processes
        first when training distributed). `cos` is normalised per modality by the samples that have it."""
        if not self._sums:
            raise RuntimeError("RollingQuery: nothing recorded; set handle.recording = True and run forwards")
        s = dict(self._sums)
        s["cos"] = s["cos"] / s["count"].clamp_min(1) * s["n"]
        return s

    def reset(self) -> None:
        self._sums, self._keys = {}, {}

    def air(self) -> torch.Tensor:
        s = self.statistics()
        a = s["cos"] / s["n"].clamp_min(1)
        return a.max(-1).values - a.min(-1).values

    def rotate(self, beta: float = 0.0, sigma: float = 0.0, method: str = "svd", sums: Optional[dict] = None) -> dict:
        """One RollingQ step from the recorded statistics (or given, already reduced, `sums`)."""
        info = rotate_from_sums(sums if sums is not None else self.statistics(), self.rotation, beta, sigma, method)
        if bool(info["rotated"].any()):
            self.rotation_count += 1
        return info

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self.reset()

    def save(self, path: str) -> None:
        from safetensors.torch import save_file

        save_file({"rotation": self.rotation.contiguous(),
                   "rotation_count": torch.tensor([self.rotation_count])}, path)

    def load(self, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(path)
        self.rotation.copy_(state["rotation"])
        self.rotation_count = int(state["rotation_count"][0])


def add_rolling_query(model: nn.Module, modality_token_ids: Optional[dict] = None,
                      query_positions: Sequence[int] = (-1,), layers: Optional[Sequence[int]] = None,
                      modalities: Optional[Sequence[str]] = None, query_mode: str = "positions") -> RollingQuery:
    """Add RollingQ's statistic and query rotation to a Hugging Face decoder (e.g. LLaVA's language model).

    `modality_token_ids`: {modality: placeholder token id}, e.g. {"image": config.image_token_id}; other
    tokens count as "text". A batch's `mm_token_type_ids` takes precedence. `query_positions`: the query
    positions to rotate (negative counts from the end; default the last token). `layers`: decoder layer
    indices (default all). `query_mode="answer"` replaces the fixed positions by the queries that predict the
    answer: per row, the positions whose next token has a label (teacher-forced training and scoring), or the
    last attended position when the forward has no labels (generation). Returns the `RollingQuery` handle;
    `handle.remove()` undoes everything.
    """
    return RollingQuery(model, modality_token_ids, query_positions, layers, modalities, query_mode)
