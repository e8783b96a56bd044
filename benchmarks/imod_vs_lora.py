"""IMoD vs LoRA at equal rank on the same tiny LLaVA and batch: step-time ratio, peak-memory ratio, parameters.

    python benchmarks/imod_vs_lora.py [--rounds 7] [--steps 3] [--hidden 256] [--batch 8] [--out benchmarks/results/imod_vs_lora.md]

Same model, batch, timing protocol and memory counter as benchmarks/moka_vs_lora.py (interleaved rounds, ratio
of medians; on CPU the memory is autograd's saved tensors plus the adapter's parameters, gradients and AdamW
state). One IMoD step = forward (which also computes both constraint gradients under no_grad), backward of
``loss + imod_loss``, AdamW step; the paper's weights (decouple 1, align 1e-4). IMoD trains exactly LoRA's
parameters; the element partition of A is a uint8 buffer (``r * d_in`` bytes per layer, listed separately).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from moka_vs_lora import _cuda, build, interleaved_medians, make_batch  # noqa: E402


def imod_loss(out):
    """The loss an IMoD step differentiates: the LM loss plus IMoD's constraint term (absent for LoRA)."""
    extra = getattr(out, "imod_loss", None)
    return out.loss if extra is None else out.loss + extra


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image", type=int, default=64, help="image side in px (patch 8: (image/8)^2 image tokens)")
    p.add_argument("--text", type=int, default=48, help="question + answer tokens per sample")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "imod_vs_lora.md"))
    a = p.parse_args(argv)

    import peft
    import torch

    import mmbalance_llm  # noqa: F401
    from mmbalance_llm.adapters.imod import ImodConfig
    from mmbalance_llm.models.modality_map import get_modality_map

    device = torch.device(a.device)
    runs = {}
    for name in ("lora", "imod"):
        model = build(a.hidden, a.layers, a.image)
        target = get_modality_map(model).target_modules_regex()
        kw = dict(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=target, init_lora_weights=False)
        pm = peft.get_peft_model(model, ImodConfig(**kw) if name == "imod" else peft.LoraConfig(**kw)).to(device)
        pm.train()
        opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
        batch = {k: v.to(device) for k, v in make_batch(model.config, a.batch, a.text, a.image).items()}
        runs[name] = dict(model=pm, opt=opt, batch=batch, times=[],
                          params=sum(q.numel() for q in pm.parameters() if q.requires_grad),
                          buffers=sum(b.numel() * b.element_size() for n, b in pm.named_buffers()
                                      if "lora_imod_partition" in n))

    def step(r):
        imod_loss(r["model"](**r["batch"])).backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=False)

    med = interleaved_medians(runs, step, a.rounds, a.steps, device, loss_of=imod_loss)
    seq = runs["lora"]["batch"]["input_ids"].shape[1]
    n_img = runs["lora"]["model"].config.image_seq_length
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mem_note = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "autograd saved tensors + adapter params/grads/AdamW state"
    lines = ["| adapter | trainable params | partition buffers | step time (median) | step-time ratio | peak memory "
             "| memory ratio |", "|---|---|---|---|---|---|---|"]
    for k in ("lora", "imod"):
        r = runs[k]
        lines.append(f"| {k} | {r['params']:,} | {r['buffers'] / 2**10:.0f} KiB | {med[k] * 1e3:.1f} ms | "
                     f"{med[k] / med['lora']:.2f}x | {r['peak'] / 2**20:.1f} MiB | "
                     f"{r['peak'] / runs['lora']['peak']:.2f}x |")
    text = (f"IMoD vs LoRA, rank {a.rank}, tiny LLaVA (LLM hidden {a.hidden}, {a.layers} layers, 7 projections "
            f"adapted), batch {a.batch} x {seq} tokens ({n_img} image tokens), {where}; {a.rounds} interleaved "
            f"rounds of {a.steps} steps, medians. Memory: {mem_note}.\n\n" + "\n".join(lines) + "\n")
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
