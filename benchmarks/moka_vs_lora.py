"""MokA vs LoRA at equal rank on the same tiny LLaVA and batch: step-time ratio, peak-memory ratio, parameters.

    python benchmarks/moka_vs_lora.py [--rounds 7] [--steps 5] [--hidden 256] [--batch 8] [--out benchmarks/results/moka_vs_lora.md]

Both adapters use rank r on the same 7 LLM projections ("equal total rank": the shared B has rank r in both;
MokA adds one r x d_in A per non-text modality). One training step = forward + backward + AdamW step.
Rounds are interleaved (LoRA, MokA, LoRA, MokA, ...) so drifting machine load hits both alike; each round
times ``--steps`` steps and the ratio is of the medians over rounds. Speed is only ever reported as a ratio
measured in one run.

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` over a step. On CPU (no allocator statistics) it is
the bytes of the distinct storages autograd saves for backward (the activation memory) plus the adapter's parameters, gradients and
AdamW state, counted with ``torch.autograd.graph.saved_tensors_hooks``; the frozen base weights are equal in
both runs and left out, which makes the CPU ratio an upper bound of the whole-process ratio.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def build(hidden: int, layers: int, image: int, seed: int = 0):
    import torch
    import transformers as T

    torch.manual_seed(seed)
    vc = T.CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                            image_size=image, patch_size=8, projection_dim=64)
    tc = T.LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 4, num_hidden_layers=layers,
                       num_attention_heads=max(hidden // 64, 1), num_key_value_heads=max(hidden // 64, 1),
                       max_position_embeddings=2048, pad_token_id=0)
    cfg = T.LlavaConfig(vision_config=vc, text_config=tc, image_token_index=511, image_seq_length=(image // 8) ** 2,
                        vision_feature_select_strategy="default", vision_feature_layer=-2)
    return T.LlavaForConditionalGeneration(cfg)


def make_batch(cfg, batch: int, text_len: int, image: int, seed: int = 0):
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img = cfg.image_seq_length
    prompt = torch.randint(1, 500, (batch, 4), generator=g)
    question = torch.randint(1, 500, (batch, text_len // 2), generator=g)
    answer = torch.randint(1, 500, (batch, text_len - text_len // 2), generator=g)
    ids = torch.cat([prompt, torch.full((batch, n_img), cfg.image_token_id), question, answer], 1)
    labels = torch.full_like(ids, -100)
    labels[:, -answer.shape[1]:] = answer
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels,
            "pixel_values": torch.randn(batch, 3, image, image, generator=g)}


def peak_bytes(model, batch, opt, device, loss_of=lambda out: out.loss) -> int:
    """Peak training memory of one step; `loss_of(outputs)` is what the step differentiates."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loss_of(model(**batch)).backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()  # whole-process peak (base weights included)
    saved = {}

    def pack(t):
        # one tensor saved by several ops (x for A_text and A_image) is one allocation: count storages once
        st = t.untyped_storage()
        saved[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = loss_of(model(**batch))
    loss.backward()
    opt.step()
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    opt.zero_grad(set_to_none=False)
    return sum(saved.values()) + trainable * 4  # params + grads + 2 AdamW moments


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--image", type=int, default=64, help="image side in px (patch 8: (image/8)^2 image tokens)")
    p.add_argument("--text", type=int, default=48, help="question + answer tokens per sample")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "moka_vs_lora.md"))
    a = p.parse_args(argv)

    import peft
    import torch

    import mmbalance_llm  # noqa: F401
    from mmbalance_llm.adapters.moka import MokaConfig
    from mmbalance_llm.models.modality_map import get_modality_map

    device = torch.device(a.device)
    runs = {}
    for name in ("lora", "moka"):
        model = build(a.hidden, a.layers, a.image)
        target = get_modality_map(model).target_modules_regex()
        kw = dict(r=a.rank, lora_alpha=2 * a.rank, lora_dropout=0.0, target_modules=target, init_lora_weights=False)
        pm = peft.get_peft_model(model, MokaConfig(**kw) if name == "moka" else peft.LoraConfig(**kw)).to(device)
        pm.train()
        opt = torch.optim.AdamW([q for q in pm.parameters() if q.requires_grad], lr=1e-4)
        batch = {k: v.to(device) for k, v in make_batch(model.config, a.batch, a.text, a.image).items()}
        runs[name] = dict(model=pm, opt=opt, batch=batch, times=[],
                          params=sum(q.numel() for q in pm.parameters() if q.requires_grad))

    def step(r):
        r["model"](**r["batch"]).loss.backward()
        r["opt"].step()
        r["opt"].zero_grad(set_to_none=False)

    med = interleaved_medians(runs, step, a.rounds, a.steps, device)
    seq = runs["lora"]["batch"]["input_ids"].shape[1]
    n_img = runs["lora"]["model"].config.image_seq_length
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    mem_note = "torch.cuda.max_memory_allocated" if device.type == "cuda" else \
        "autograd saved tensors + adapter params/grads/AdamW state"
    lines = [
        "| adapter | trainable params | step time (median) | step-time ratio | peak memory | memory ratio |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("lora", "moka"):
        r = runs[k]
        lines.append(f"| {k} | {r['params']:,} | {med[k] * 1e3:.1f} ms | {med[k] / med['lora']:.2f}x | "
                     f"{r['peak'] / 2**20:.1f} MiB | {r['peak'] / runs['lora']['peak']:.2f}x |")
    text = (f"MokA vs LoRA, rank {a.rank}, tiny LLaVA (LLM hidden {a.hidden}, {a.layers} layers, 7 projections "
            f"adapted), batch {a.batch} x {seq} tokens ({n_img} image tokens), {where}; {a.rounds} interleaved "
            f"rounds of {a.steps} steps, medians. Memory: {mem_note}.\n\n" + "\n".join(lines) + "\n\n"
            f"Targets: step-time ratio <= 1.3x ({'met' if med['moka'] / med['lora'] <= 1.3 else 'NOT met'}), "
            f"memory ratio <= 1.1x ({'met' if runs['moka']['peak'] / runs['lora']['peak'] <= 1.1 else 'NOT met'}).\n")
    print(text)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return 0


def interleaved_medians(runs: dict, step, rounds: int, steps: int, device, loss_of=lambda out: out.loss) -> dict:
    """Warm each run up and record its peak memory (`r["peak"]`), then time `steps` steps of every run in each of
    `rounds` interleaved rounds; returns each run's median step time."""
    import torch

    for r in runs.values():  # warm-up (allocator, kernels) and memory
        step(r)
        r["peak"] = peak_bytes(r["model"], r["batch"], r["opt"], device, loss_of=loss_of)
    for _ in range(rounds):
        for r in runs.values():
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(steps):
                step(r)
            if device.type == "cuda":
                torch.cuda.synchronize()
            r["times"].append((time.perf_counter() - t0) / steps)
    return {k: statistics.median(r["times"]) for k, r in runs.items()}


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


if __name__ == "__main__":
    sys.exit(main())
