"""Supervised fine-tuning of HF multimodal LLMs (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) with MokA or LoRA.

``mmbalance train recipes/llava/moka_sft_tiny.yaml [dotted.key=value ...]`` (recipe with ``task: sft``) or
``python -m mmbalance_llm.train.sft RECIPE [overrides]``. Runs under ``accelerate launch`` unchanged.

What a run does
* loads the model with its modality map, wraps it with ``adapter: moka | lora | none`` (peft), freezes or
  unfreezes the tower / projector / language model as the recipe says (unfrozen parts of an adapter run are
  peft ``modules_to_save``, so they land in the adapter file);
* trains on assistant tokens only (``data/chat.py`` collation), logging ``metrics.jsonl`` on the main process;
* evaluates on the validation split at step 0 and after every epoch (loss + answer accuracy) and keeps the best
  adapter (safetensors, via peft) in ``output_dir/best``;
* reloads the best weights, reads the test split once, writes ``final_metrics.json``. For adapter-only runs
  the same pass also scores the base model with the adapter disabled (= the model before training, since B
  starts at zero), which gives the before/after numbers.

Answer accuracy: ``eval.accuracy: options`` scores every answer option by the summed log-probability of its
tokens (records need ``options`` + ``answer``, as the synthetic set has); ``generate`` compares the first
word of a greedy reply with ``answer`` (or the reference reply). Both report per-``needs`` accuracy too.
"""
from __future__ import annotations

import copy
import difflib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import yaml

DEFAULTS: dict[str, Any] = {
    "task": "sft",
    "output_dir": "runs/sft",
    "adapter": "moka",
    "adapter_config": {},  # MokaConfig / LoraConfig fields; checked against the class
    "model": {
        "name_or_path": None,
        "build_tiny": None,      # family: build the tiny twin at name_or_path when the folder does not exist
        "dtype": "float32",
        "attn_implementation": None,
        "gradient_checkpointing": False,
        "freeze": {"tower": True, "projector": True, "language_model": True},
    },
    "data": {
        "train": None, "validation": None, "test": None, "media_root": None, "max_length": 512,
        "media_cache": 0,        # processed media kept in memory by path (small media: set ~ dataset size)
        "precheck": True,        # encode every sample once before training, so a bad one fails first, by name
        "generate": None,        # {modalities, n_train, n_validation, n_test, seed}: write the synthetic set if missing
    },
    "train": {
        "epochs": 3, "max_steps": None, "batch_size": 8, "grad_accum": 1, "lr": 2e-4, "weight_decay": 0.0,
        "scheduler": "cosine", "warmup_ratio": 0.03, "max_grad_norm": 1.0, "seed": 0, "log_every": 10,
        "mixed_precision": "no", "num_workers": 0,
    },
    "eval": {"accuracy": "options", "batch_size": 32, "max_new_tokens": 8, "max_samples": None},
}
MOKA_ONLY_FIELDS = {"modalities", "cross_attention_weight", "question_after_media"}
_FREE_FORM = {"adapter_config", "data.generate"}  # sections checked elsewhere (or free-form)


class RecipeError(ValueError):
    pass


# ------------------------------------------------------------------------------------------ recipe handling
def _suggest(key: str, valid) -> str:
    m = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{m[0]}'?)" if m else f" (valid: {', '.join(sorted(valid))})"


def _check_keys(raw: dict, schema: dict, where: str = "") -> None:
    for k, v in raw.items():
        path = f"{where}{k}"
        if k not in schema:
            raise RecipeError(f"unknown recipe key '{path}'{_suggest(k, schema)}")
        if isinstance(schema[k], dict) and path not in _FREE_FORM:
            if v is not None and not isinstance(v, dict):
                raise RecipeError(f"recipe key '{path}' must be a mapping, got {type(v).__name__}")
            _check_keys(v or {}, schema[k], path + ".")


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, dict) and k != "adapter_config" else v
    return out


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    raw = copy.deepcopy(raw)
    for text in overrides or []:
        if "=" not in text:
            raise RecipeError(f"override '{text}' is not of the form dotted.key=value")
        key, value = text.split("=", 1)
        parts = key.split(".")
        node = raw
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override '{text}': '{p}' is not a section")
        node[parts[-1]] = yaml.safe_load(value) if value else ""
    return raw


def load_sft_recipe(path: str | Path | dict, overrides: list[str] | None = None) -> dict:
    """YAML (``yaml.safe_load``) + overrides, checked against :data:`DEFAULTS`; relative paths resolved."""
    if isinstance(path, dict):
        raw, base = copy.deepcopy(path), Path.cwd()
    else:
        p = Path(path)
        if not p.is_file():
            raise RecipeError(f"recipe not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        base = Path.cwd()
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    raw = apply_overrides(raw, overrides or [])
    _check_keys(raw, DEFAULTS)
    cfg = _merge(DEFAULTS, raw)
    if cfg["task"] != "sft":
        raise RecipeError(f"task must be 'sft' for this loop, got {cfg['task']!r}")
    if cfg["adapter"] not in ("moka", "lora", "none"):
        raise RecipeError(f"adapter must be one of moka, lora, none; got {cfg['adapter']!r}")
    if cfg["eval"]["accuracy"] not in ("options", "generate"):
        raise RecipeError(f"eval.accuracy must be 'options' or 'generate', got {cfg['eval']['accuracy']!r}")
    if not cfg["model"]["name_or_path"]:
        raise RecipeError("model.name_or_path is required")
    for s in ("train", "validation"):
        if not cfg["data"][s]:
            raise RecipeError(f"data.{s} is required")
    if cfg["adapter"] != "none":
        _check_adapter_fields(cfg)
    cfg["_base_dir"] = str(base)
    return cfg


def _check_adapter_fields(cfg: dict):
    import dataclasses

    import peft

    from mmbalance_llm.adapters.moka import MokaConfig

    cls = MokaConfig if cfg["adapter"] == "moka" else peft.LoraConfig
    fields = {f.name for f in dataclasses.fields(cls)}
    if cls is not MokaConfig:
        # so one recipe switches with adapter=lora: MokA-only fields are dropped, and said so
        moka_only = sorted(set(cfg["adapter_config"] or {}) & MOKA_ONLY_FIELDS)
        if moka_only:
            print(f"[mmbalance] adapter={cfg['adapter']}: ignoring MokA-only adapter_config keys {moka_only}",
                  file=sys.stderr)
            cfg["adapter_config"] = {k: v for k, v in cfg["adapter_config"].items() if k not in MOKA_ONLY_FIELDS}
    for k in cfg["adapter_config"] or {}:
        if k not in fields:
            raise RecipeError(f"unknown recipe key 'adapter_config.{k}' for {cls.__name__}{_suggest(k, fields)}")
    return cls


def _adapter_config(cfg: dict, mmap):
    """A MokaConfig / LoraConfig from ``adapter_config`` (unknown fields: error with a suggestion)."""
    cls = _check_adapter_fields(cfg)
    kw = dict(cfg["adapter_config"] or {})
    if kw.get("target_modules") is None:
        kw["target_modules"] = mmap.target_modules_regex()  # LM only; LoRA's default would also wrap towers
    unfrozen = [c for c, frozen in cfg["model"]["freeze"].items() if not frozen]
    if unfrozen:
        mods = list(kw.get("modules_to_save") or [])
        comps = mmap.components()
        for c in unfrozen:
            if c == "language_model":
                raise RecipeError("model.freeze.language_model: false with an adapter would train the whole LLM; "
                                  "use adapter: none for full fine-tuning")
            mods += [p for p in comps[c]]
        kw["modules_to_save"] = mods
    return cls(**kw)


# ------------------------------------------------------------------------------------------ evaluation
def _chunks(xs, n):
    for i in range(0, len(xs), n):
        yield xs[i:i + n]


def _to(batch, device, dtype):
    import torch

    return {k: (v.to(device, dtype) if torch.is_floating_point(v) else v.to(device)) for k, v in batch.items()}


def evaluate(model, collator, records, cfg, device, dtype) -> dict:
    """Loss and answer accuracy (overall and per ``needs``) on ``records``."""
    import torch

    ecfg = cfg["eval"]
    model.eval()
    loss_sum = n_tok = 0.0
    correct, total, per = 0, 0, {}
    with torch.no_grad():
        for recs in _chunks(records, ecfg["batch_size"]):
            b = _to(collator(recs), device, dtype)
            n = int((b["labels"][:, 1:] != -100).sum())
            loss_sum += float(model(**b).loss) * n
            n_tok += n
            hits = (_score_options if ecfg["accuracy"] == "options" else _generate_answers)(model, collator, recs,
                                                                                           ecfg, device, dtype)
            for r, h in zip(recs, hits):
                correct += h
                total += 1
                k = r.get("needs", "all")
                c, t = per.get(k, (0, 0))
                per[k] = (c + h, t + 1)
    model.train()
    out = {"loss": loss_sum / max(n_tok, 1), "accuracy": correct / max(total, 1), "n": total}
    out.update({f"accuracy_{k}": c / t for k, (c, t) in sorted(per.items())})
    return out


def _score_options(model, collator, recs, ecfg, device, dtype) -> list[int]:
    import torch

    encs, owner = [], []
    for i, r in enumerate(recs):
        if not r.get("options") or r.get("answer") is None:
            raise RecipeError(f"eval.accuracy=options needs 'options' and 'answer' in sample id={r.get('id')}; "
                              "use eval.accuracy=generate")
        media = collator._media_tokens(r, f"sample id={r.get('id')}")  # once per record, not per option
        for opt in r["options"]:
            encs.append(collator.encode(r, answer=opt, media=media))
            owner.append(i)
    scores = []
    for chunk in _chunks(encs, ecfg["batch_size"]):
        b = _to(collator.pad(chunk), device, dtype)
        # labels go into the forward too: MokA reads them to keep the option tokens out of the question keys
        logits = model(**b).logits[:, :-1].float()
        tgt = b["labels"][:, 1:]
        lp = torch.log_softmax(logits, -1).gather(-1, tgt.clamp(min=0)[..., None])[..., 0]
        scores += (lp * (tgt != -100)).sum(1).tolist()
    best = {}
    for i, (o, s) in enumerate(zip(owner, scores)):
        k = i - owner.index(o)
        if o not in best or s > best[o][1]:
            best[o] = (k, s)
    return [int(recs[o]["options"][best[o][0]] == recs[o]["answer"]) for o in range(len(recs))]


def _generate_answers(model, collator, recs, ecfg, device, dtype) -> list[int]:
    encs = [collator.encode(r, add_answer=False) for r in recs]
    b = _to(collator.pad(encs, padding_side="left"), device, dtype)
    b.pop("labels")
    gen = model.generate(**b, max_new_tokens=ecfg["max_new_tokens"], do_sample=False)
    texts = collator.tok.batch_decode(gen[:, b["input_ids"].shape[1]:], skip_special_tokens=True)
    hits = []
    for r, t in zip(recs, texts):
        ref = r.get("answer") or r["messages"][-1]["content"]
        first = (t.strip().split() or [""])[0].strip(".,!?").lower()
        hits.append(int(first == str(ref).strip().split()[0].strip(".,!?").lower()))
    return hits


# ------------------------------------------------------------------------------------------ the run
def _resolve(cfg, p):
    return None if p is None else str(Path(p) if Path(p).is_absolute() else Path(cfg["_base_dir"]) / p)


def prepare_assets(cfg: dict) -> None:
    """Build the tiny model / synthetic data the recipe names when they are missing (main process first)."""
    mpath = _resolve(cfg, cfg["model"]["name_or_path"])
    if cfg["model"]["build_tiny"] and not Path(mpath).exists():
        from mmbalance_llm.models.tiny import build_tiny

        build_tiny(cfg["model"]["build_tiny"], mpath, seed=cfg["train"]["seed"])
    gen = cfg["data"]["generate"]
    train = _resolve(cfg, cfg["data"]["train"])
    if gen and not Path(train).exists():
        from mmbalance_llm.data.mm_synthetic import write_instruction_set

        allowed = {"modalities", "n_train", "n_validation", "n_test", "seed", "fmt"}
        for k in gen:
            if k not in allowed:
                raise RecipeError(f"unknown recipe key 'data.generate.{k}'{_suggest(k, allowed)}")
        write_instruction_set(Path(train).parent, **{**gen, "modalities": tuple(gen.get("modalities", ["image"]))})


def run(cfg: dict) -> dict:
    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    from mmbalance_llm.data.chat import ChatCollator, load_conversations, load_processor
    from mmbalance_llm.models.modality_map import component_parameters, get_modality_map, model_class_for

    tc = cfg["train"]
    from accelerate.utils import DistributedDataParallelKwargs

    # a modality absent from a batch (no video in image data, text-only items) leaves its MokA A without
    # gradient on that step; DDP must be told, or it waits forever for those parameters
    ddp = DistributedDataParallelKwargs(find_unused_parameters=cfg["adapter"] == "moka")
    acc = Accelerator(gradient_accumulation_steps=tc["grad_accum"], mixed_precision=tc["mixed_precision"],
                      kwargs_handlers=[ddp])
    out_dir = Path(_resolve(cfg, cfg["output_dir"]))
    if acc.is_main_process:
        prepare_assets(cfg)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(yaml.safe_dump({k: v for k, v in cfg.items() if k != "_base_dir"}))
    acc.wait_for_everyone()
    set_seed(tc["seed"])

    mpath = _resolve(cfg, cfg["model"]["name_or_path"])
    dtype = getattr(torch, cfg["model"]["dtype"])
    from transformers import AutoConfig

    mcfg = AutoConfig.from_pretrained(mpath)
    kw = {"dtype": dtype}
    if cfg["model"]["attn_implementation"]:
        kw["attn_implementation"] = cfg["model"]["attn_implementation"]
    model = model_class_for(mcfg).from_pretrained(mpath, **kw)
    processor = load_processor(mpath)
    mmap = get_modality_map(model)
    for comp, frozen in cfg["model"]["freeze"].items():
        if comp not in ("tower", "projector", "language_model"):
            raise RecipeError(f"unknown recipe key 'model.freeze.{comp}'{_suggest(comp, ['tower', 'projector', 'language_model'])}")
        for p in component_parameters(model, comp):
            p.requires_grad_(not frozen)
    if cfg["model"]["gradient_checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if cfg["adapter"] != "none":
        import peft

        model = peft.get_peft_model(model, _adapter_config(cfg, mmap))
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)

    d = cfg["data"]
    media_root = _resolve(cfg, d["media_root"])
    splits = {s: load_conversations(_resolve(cfg, d[s]), media_root) for s in ("train", "validation", "test") if d[s]}
    if cfg["eval"]["max_samples"]:
        for s in ("validation", "test"):
            if s in splits:
                splits[s] = splits[s][: cfg["eval"]["max_samples"]]
    collator = ChatCollator(processor, model.config, max_length=d["max_length"], media_cache_size=d["media_cache"])
    if d["precheck"]:  # fail on a bad sample (e.g. media cut by max_length) before training, naming it
        for s_name, recs in splits.items():
            for i, r in enumerate(recs):
                collator.encode(r, where=f"{d[s_name]}: sample {i} (id={r['id']})")
    loader = torch.utils.data.DataLoader(splits["train"], batch_size=tc["batch_size"], shuffle=True,
                                         collate_fn=collator, num_workers=tc["num_workers"])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(tc["lr"]), weight_decay=float(tc["weight_decay"]))
    model, opt, loader = acc.prepare(model, opt, loader)
    steps_per_epoch = math.ceil(len(loader) / tc["grad_accum"])  # per process, after sharding
    total = tc["max_steps"] or steps_per_epoch * tc["epochs"]
    # accelerate steps a prepared scheduler once per process each optimizer step, hence the factor
    n = acc.num_processes
    sched = acc.prepare(get_scheduler(tc["scheduler"], opt, num_warmup_steps=int(tc["warmup_ratio"] * total) * n,
                                      num_training_steps=total * n))

    log_path = out_dir / "metrics.jsonl"
    if acc.is_main_process:
        log_path.write_text("")

    def log(row):
        if acc.is_main_process:
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")

    def evaluate_split(name):
        recs = splits[name][acc.process_index::acc.num_processes]
        m = evaluate(acc.unwrap_model(model), collator, recs, cfg, acc.device, dtype)
        t = torch.tensor([m["accuracy"] * m["n"], m["loss"] * m["n"], m["n"]], device=acc.device, dtype=torch.float64)
        t = acc.reduce(t, "sum")
        m.update(accuracy=float(t[0] / t[2]), loss=float(t[1] / t[2]), n=int(t[2]))
        return m

    best_dir = out_dir / "best"
    val0 = evaluate_split("validation")
    log({"step": 0, "epoch": 0, "split": "validation", **val0, "trainable_params": n_train})
    best = (val0["accuracy"], -val0["loss"], 0)
    _save(acc, model, best_dir, cfg)
    step, epoch = 0, 0
    bar = tqdm(total=total, disable=not acc.is_main_process, desc=f"sft {cfg['adapter']}")
    model.train()
    while step < total:
        epoch += 1
        for batch in loader:
            with acc.accumulate(model):
                loss = model(**_to(batch, acc.device, dtype)).loss
                acc.backward(loss)
                if acc.sync_gradients and tc["max_grad_norm"]:
                    acc.clip_grad_norm_(params, tc["max_grad_norm"])
                opt.step()
                sched.step()
                opt.zero_grad()
            if acc.sync_gradients:
                step += 1
                bar.update(1)
                if step % tc["log_every"] == 0:
                    log({"step": step, "epoch": epoch, "split": "train", "loss": float(loss.detach()),
                         "lr": sched.get_last_lr()[0]})
                if step >= total:
                    break
        val = evaluate_split("validation")
        log({"step": step, "epoch": epoch, "split": "validation", **val})
        if (val["accuracy"], -val["loss"]) > best[:2]:
            best = (val["accuracy"], -val["loss"], step)
            _save(acc, model, best_dir, cfg)
    bar.close()
    acc.wait_for_everyone()

    final = {"adapter": cfg["adapter"], "trainable_params": n_train, "best_step": best[2],
             "validation_accuracy_before": val0["accuracy"], "validation_accuracy_best": best[0]}
    if "test" in splits:  # read once, at the end, with the best weights
        _load_best(acc.unwrap_model(model), best_dir, cfg)
        test = evaluate_split("test")
        final["test"] = test
        only_adapter = cfg["adapter"] != "none" and all(cfg["model"]["freeze"].values())
        if only_adapter:  # B starts at zero: the disabled adapter is exactly the model before training
            with acc.unwrap_model(model).disable_adapter():
                final["test_before_training"] = evaluate_split("test")
    if acc.is_main_process:
        (out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
    return final


def _save(acc, model, path: Path, cfg) -> None:
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(path, safe_serialization=True)


def _load_best(model, path: Path, cfg) -> None:
    if cfg["adapter"] == "none":
        from safetensors.torch import load_file

        sd = {}
        for f in sorted(path.glob("*.safetensors")):
            sd.update(load_file(f))
        model.load_state_dict(sd, strict=False)
        return
    from peft.utils import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(path / "adapter_model.safetensors"))


def main(recipe_path: str, overrides: list[str]) -> int:
    """Entry point for ``mmbalance train RECIPE`` when the recipe has ``task: sft``."""
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
        os.environ.setdefault(k, "1")
    try:
        cfg = load_sft_recipe(recipe_path, overrides)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    final = run(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        t = final.get("test", {})
        print(json.dumps({"test_accuracy": t.get("accuracy"),
                          "test_accuracy_before_training": final.get("test_before_training", {}).get("accuracy"),
                          "trainable_params": final["trainable_params"]}, indent=2))
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print("usage: python -m mmbalance_llm.train.sft RECIPE [dotted.key=value ...]", file=sys.stderr)
        sys.exit(2)
    sys.exit(main(sys.argv[1], sys.argv[2:]))
