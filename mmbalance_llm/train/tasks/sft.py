"""Task `sft`: supervised fine-tuning of HF multimodal LLMs (LLaVA, Qwen2-VL, Qwen2.5-VL, Qwen2-Audio) with
MokA, IMoD, LoRA or full fine-tuning, through the same loop, checkpoints and balancer hooks as the classifiers.

* The model is loaded with its modality map (`model.name_or_path`: a local folder, or a hub id passed to
  `from_pretrained` unchanged), wrapped with `adapter: moka | imod | lora | none` (peft), and frozen / unfrozen as
  `model.freeze` says (unfrozen tower / projector of an adapter run are peft `modules_to_save`).
* Training labels only assistant tokens (data/chat.py); every split is preprocessed once and cached
  (tasks/sft_data.py).
* Validation (loss, answer accuracy overall and per `needs`) runs before the first step and after every
  epoch; `best/` holds what `from_pretrained` and `mmbalance reliance` need: the adapter (or the full model)
  and the processor.
* For adapter-only runs the test pass also scores the model with the adapter disabled, which is exactly the
  model before training since B starts at zero (`test_before_training`).

Balancer modalities are the model's media kinds plus "text"."""
from __future__ import annotations

import os
from pathlib import Path

from mmbalance_llm.config import RecipeError, adapter_config_class
from mmbalance_llm.train.tasks.base import Task

LOCAL_PREFIXES = ("/", "./", "../", "~")


def resolve_model_path(name: str) -> str:
    """A local folder when it exists (or looks like a path); otherwise a hub id, returned unchanged."""
    expanded = os.path.expanduser(name)
    if os.path.isdir(expanded):
        return expanded
    if name.startswith(LOCAL_PREFIXES) or name.count("/") > 1 or os.sep != "/" and os.sep in name:
        raise RecipeError(f"model.name_or_path '{name}' is not a folder (set model.build_tiny to create a tiny "
                          "twin there, or give a hub id such as llava-hf/llava-1.5-7b-hf)")
    return name


class SFTTask(Task):
    name = "sft"
    eval_at_start = True
    tie_break = "loss"

    def __init__(self, recipe):
        super().__init__(recipe)
        # a modality absent from a batch (no audio in image data, text-only items) leaves its MokA A without
        # gradient on that step; DDP must be told, or it waits forever for those parameters
        self.find_unused_parameters = recipe.adapter == "moka"

    # -- building ----------------------------------------------------------------------------------
    def prepare_assets(self) -> None:
        m, d = self.recipe.model, self.recipe.data
        if m.build_tiny and not Path(m.name_or_path).exists():
            from mmbalance_llm.models.tiny import build_tiny

            build_tiny(m.build_tiny, m.name_or_path, seed=self.recipe.train.seed)
        if d.generate and not Path(d.train).exists():
            from mmbalance_llm.data.mm_synthetic import write_instruction_set

            gen = d.generate
            write_instruction_set(Path(d.train).parent, **{**gen, "modalities": tuple(gen.get("modalities", ["image"]))})

    def _hub_kwargs(self) -> dict:
        m = self.recipe.model
        kw = {"trust_remote_code": m.trust_remote_code}
        if m.revision:
            kw["revision"] = m.revision
        return kw

    def load_data(self, datasets=None) -> None:
        import torch
        from transformers import AutoConfig

        from mmbalance_llm.data.chat import ChatCollator, load_conversations, load_processor
        from mmbalance_llm.models.modality_map import get_modality_map
        from mmbalance_llm.train.tasks.sft_data import preprocess_split, processor_identity
        from mmbalance_llm.train.tasks.sft_eval import SFTEvaluator

        r, d = self.recipe, self.recipe.data
        self.model_path = resolve_model_path(r.model.name_or_path)
        self.model_config = AutoConfig.from_pretrained(self.model_path, **self._hub_kwargs())
        self.mmap = get_modality_map(self.model_config)
        self.processor = load_processor(self.model_path)
        self.modalities = list(self.mmap.modalities) + ["text"]
        self.dtype = getattr(torch, r.model.dtype)
        self.collator = ChatCollator(self.processor, self.model_config, max_length=d.max_length,
                                     video_fps=d.video_fps, video_max_frames=d.video_max_frames)
        if datasets is not None:
            splits = {s: list(datasets[s]) for s in ("train", "validation", "test") if s in datasets}
            sources = {s: f"datasets['{s}']" for s in splits}
        else:
            splits = {s: load_conversations(getattr(d, s), d.media_root) for s in ("train", "validation", "test")
                      if getattr(d, s)}
            sources = {s: getattr(d, s) for s in splits}
        for s in ("train", "validation"):
            if not splits.get(s):
                raise RecipeError(f"split '{s}' of the SFT data is missing or empty")
        if r.eval.max_samples:
            for s in ("validation", "test"):
                if s in splits:
                    splits[s] = splits[s][: r.eval.max_samples]
        self.records = splits
        from mmbalance_llm.train.tasks.sft_eval import eval_groups

        self.needs = {s: sorted({g for x in recs for g in eval_groups(x)}) for s, recs in splits.items()}
        import datasets as hf_datasets

        cache_dir = d.cache_dir or os.path.join(hf_datasets.config.HF_DATASETS_CACHE, "mmbalance_llm_sft")
        settings = {"processor": processor_identity(self.model_path), "model_type": self.model_config.model_type,
                    "max_length": d.max_length, "video_fps": d.video_fps, "video_max_frames": d.video_max_frames}
        keys = None
        self.preprocessed = {}
        for s in splits:  # every split once: a bad sample fails here, by name, before anything is written
            self.preprocessed[s], keys = preprocess_split(self.collator, splits[s], s, sources[s], settings, cache_dir,
                                                          d.preprocessing_num_workers, keys)
        self.media_keys = keys
        self.train_dataset = self.preprocessed["train"]
        self.evaluator = SFTEvaluator(self.collator, r.eval, r.train.per_device_eval_batch_size, self.dtype)

    def check_engine(self, accelerator) -> None:
        from mmbalance_llm.balance.base import zero_stage

        if self.recipe.adapter == "imod" and zero_stage(accelerator) == 3:
            from mmbalance_llm.config import RecipeError

            raise RecipeError("adapter: imod computes its constraint gradients from each layer's A during the "
                              "forward, which DeepSpeed ZeRO-3 partitions; it runs under DDP and ZeRO-1/2")

    def setup(self, accelerator, model, make_loader=None) -> None:
        super().setup(accelerator, model, make_loader)
        # the training split in a fixed order, for methods that measure over it (RollingQ's estimation pass);
        # building it costs nothing until a method iterates it
        self.loaders = {"train_eval": accelerator.prepare(make_loader(
            self.train_dataset, False, self.recipe.train.per_device_eval_batch_size, self.collate))}

    def build_model(self, balancer, model=None):
        import peft

        from mmbalance_llm.models.modality_map import component_parameters, model_class_for

        r, m = self.recipe, self.recipe.model
        if model is None:
            kw = {"dtype": self.dtype, **self._hub_kwargs()}
            if m.attn_implementation:
                kw["attn_implementation"] = m.attn_implementation
            model = model_class_for(self.model_config).from_pretrained(self.model_path, **kw)
        for comp, frozen in m.freeze.items():
            for p in component_parameters(model, comp):
                p.requires_grad_(not frozen)
        if m.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        if r.adapter != "none":
            # seeded again: loading under DeepSpeed ZeRO-3 initialises the weights inside zero.Init, which draws
            # from the generators (a plain from_pretrained draws nothing, so this changes no other run), and the
            # adapter's initial A must not depend on the engine
            from accelerate.utils import set_seed

            set_seed(r.train.seed)
            model = peft.get_peft_model(model, self._adapter_config())
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    def _adapter_config(self):
        r = self.recipe
        cls = adapter_config_class(r)
        kw = dict(r.adapter_config)
        if kw.get("target_modules") is None:
            kw["target_modules"] = self.mmap.target_modules_regex()  # LM only; LoRA's default would also wrap towers
        unfrozen = [c for c, frozen in r.model.freeze.items() if not frozen]
        if unfrozen:
            comps = self.mmap.components()
            kw["modules_to_save"] = list(kw.get("modules_to_save") or []) + [p for c in unfrozen for p in comps[c]]
        try:
            return cls(**kw)
        except (TypeError, ValueError) as exc:
            raise RecipeError(f"adapter_config: {str(exc).splitlines()[0]}") from None

    def metric_names(self) -> list:
        names = ["loss", "accuracy"]
        for k in self.needs.get("validation", []):
            names.append(f"accuracy_{k}")
        return names

    def collate(self, rows):
        from mmbalance_llm.train.tasks.sft_data import pad_rows

        tok = self.collator.tok
        return pad_rows(rows, self.media_keys, tok.pad_token_id if tok.pad_token_id is not None else 0,
                        self.mmap.uses_mm_token_type_ids, self.dtype)

    def has_split(self, split: str) -> bool:
        return split in self.records

    # -- a step ------------------------------------------------------------------------------------
    def forward(self, model, batch):
        return model(**batch)

    def loss(self, batch, outputs):
        return outputs.loss, {}

    def extra_loss(self, outputs):
        """IMoD's constraint term (value: the weighted constraints; gradient: only their injected gradient on
        each layer's A), under every balancing method; None for the other adapters."""
        return getattr(outputs, "imod_loss", None)

    # -- evaluation and saving ---------------------------------------------------------------------
    def evaluate(self, model, split: str) -> dict:
        acc = self.accelerator
        recs = self.records[split][acc.process_index::acc.num_processes]
        metrics = self.evaluator.evaluate(acc.unwrap_model(model), split, recs, self.needs[split], acc)
        if split == "validation" and self.recipe.eval.diagnostics_max_samples:
            metrics.update(self.diagnostics(model))
        return metrics

    def diagnostics(self, model) -> dict:
        """eval/mllm_diagnostics.py on the first `eval.diagnostics_max_samples` validation samples (this rank's
        share; the sums are reduced over processes), as `diagnostics/...` keys."""
        import torch

        from mmbalance_llm.eval.mllm_diagnostics import sft_diagnostics
        from mmbalance_llm.train.tasks.sft_eval import chunks, to_device

        acc = self.accelerator
        if getattr(self, "_diag_batches", None) is None:
            cap = self.recipe.eval.diagnostics_max_samples
            recs = self.records["validation"][:cap][acc.process_index::acc.num_processes]
            bs = self.recipe.train.per_device_eval_batch_size
            self._diag_batches = [self.collator.pad([self.collator.encode(r) for r in g]) for g in chunks(recs, bs)]
        batches = [to_device(b, acc.device, self.dtype) for b in self._diag_batches]
        with torch.no_grad():  # the gradient share turns gradients back on for its own pass only
            out = sft_diagnostics(acc.unwrap_model(model), batches, accelerator=acc)
        return {f"diagnostics/{k}": v for k, v in out.items()}

    def summary(self, metrics: dict) -> str:
        line = super().summary(metrics)
        per = [f"{k[len('accuracy_'):]} {v:.4f}" for k, v in metrics.items() if k.startswith("accuracy_")]
        return line + (", needs " + " ".join(per) if per else "")

    def save_best(self, accelerator, model, path: str) -> None:
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            net = accelerator.unwrap_model(model)
            net.save_pretrained(path, safe_serialization=True)
            self.processor.save_pretrained(path)  # so from_pretrained / mmbalance reliance work on best/ alone

    def load_best(self, accelerator, model, path: str) -> None:
        from safetensors.torch import load_file

        net = accelerator.unwrap_model(model)
        if self.recipe.adapter == "none":
            state = {}
            for f in sorted(Path(path).glob("*.safetensors")):
                state.update(load_file(f))
            net.load_state_dict(state, strict=False)
            return
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(net, load_file(os.path.join(path, "adapter_model.safetensors")))

    def final_extras(self, model) -> dict:
        r = self.recipe
        out = {"adapter": r.adapter, "trainable_params": self.trainable_params}
        if "test" in self.records and r.adapter != "none" and all(r.model.freeze.values()):
            # B starts at zero: the disabled adapter is exactly the model before training
            with self.accelerator.unwrap_model(model).disable_adapter():
                out["test_before_training"] = self.evaluate(model, "test")
        return out

    def plots(self, output_dir: str, metrics_path: str, state: dict, title: str) -> None:
        from mmbalance_llm.eval.plots import plot_sft_run

        plot_sft_run(metrics_path, os.path.join(output_dir, "curves.png"), title=f"{title}: validation")
        if self.recipe.eval.diagnostics_max_samples:
            from mmbalance_llm.eval.mllm_diagnostics_plot import plot_sft_diagnostics

            plot_sft_diagnostics(metrics_path, os.path.join(output_dir, "diagnostics.png"),
                                 title=f"{title}: diagnostics")
