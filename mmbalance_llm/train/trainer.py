"""The training loop. Read it top to bottom: build, (resume), epochs of steps, evaluate, report.

Methods plug in through the balancer hooks (balance/base.py); there is no per-method code here.
Checkpoint choice reads only the validation split; test is evaluated once, at the end, on the best model.
"""
from __future__ import annotations

import math
import os
import shutil
import time

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmbalance_llm.balance import method_config
from mmbalance_llm.balance.base import TrainContext
from mmbalance_llm.config import Recipe, dump_recipe, load_recipe
from mmbalance_llm.data.features import collate, load_feature_data
from mmbalance_llm.eval.evaluator import evaluate
from mmbalance_llm.train import checkpoint as ckpt
from mmbalance_llm.train.io import write_json_atomic
from mmbalance_llm.train.logger import RunLogger
from mmbalance_llm.train.setup import make_accelerator, make_optimizer, make_scheduler

LOWER_IS_BETTER = ("loss", "imbalance")


class Trainer:
    def __init__(self, recipe: Recipe):
        from accelerate.utils import set_seed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training bar
        self.recipe = recipe
        cfg = recipe.train
        balancer_cls, balancer_config = method_config(recipe.balance)
        self.balancer = balancer_cls(balancer_config)
        self.accelerator = acc = make_accelerator(cfg, balancer_cls.find_unused_parameters)
        set_seed(cfg.seed)

        # Everything that can reject the input runs before the output folder is touched.
        self.data = load_feature_data(recipe.data, recipe.model.num_classes, seed=cfg.seed)
        model = self.balancer.build_model(recipe.model, self.data.modalities, self.data.input_shapes,
                                          self.data.num_classes)
        self.resume_dir = ckpt.resolve_resume(cfg.resume_from, recipe.output_dir)

        def loader(ds, shuffle, batch_size):
            gen = torch.Generator().manual_seed(cfg.seed)
            return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate,
                              num_workers=recipe.data.num_workers)

        train_loader = loader(self.data.train, True, cfg.batch_size)
        self.steps_per_epoch = math.ceil(len(train_loader) / cfg.gradient_accumulation_steps)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, self.steps_per_epoch)
        (self.model, self.optimizer, self.train_loader, self.scheduler, self.val_loader,
         self.train_eval_loader) = acc.prepare(model, optimizer, train_loader, scheduler,
                                               loader(self.data.validation, False, cfg.eval_batch_size),
                                               loader(self.data.train, False, cfg.eval_batch_size))
        self.test_loader = (acc.prepare(loader(self.data.test, False, cfg.eval_batch_size))
                            if self.data.test is not None else None)

        self.ctx = TrainContext(
            accelerator=acc, modalities=self.data.modalities, num_classes=self.data.num_classes, recipe=recipe,
            loaders={"train": self.train_loader, "train_eval": self.train_eval_loader,
                     "validation": self.val_loader},
            seed=cfg.seed, trainer=self)
        self.balancer.setup(self.ctx, self.model)
        self.state = {"global_step": 0, "epoch": 0, "batches_done": 0, "best_metric": None, "best_step": None,
                      "best_epoch": None, "best_validation": None}
        self.output_dir = recipe.output_dir
        self.step_seconds, self.progress = 0.0, tqdm(disable=True)  # fit() replaces the bar
        self._prepare_output_dir()

    # -- output folder, resume --------------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        acc, out = self.accelerator, self.output_dir
        if acc.is_main_process:
            os.makedirs(out, exist_ok=True)
            if self.resume_dir is None:  # a fresh run must not pick up an older run's checkpoints or best model
                for old in ckpt.list_checkpoints(out) + [os.path.join(out, "best")]:
                    shutil.rmtree(old, ignore_errors=True)
                if os.path.exists(os.path.join(out, "final_metrics.json")):
                    os.remove(os.path.join(out, "final_metrics.json"))
            dump_recipe(self.recipe, os.path.join(out, "config.yaml"))
        acc.wait_for_everyone()
        if self.resume_dir is not None:
            acc.load_state(self.resume_dir)
            self.state = ckpt.load_trainer_state(self.resume_dir)
            self.balancer.load_state_dict(ckpt.load_balancer_state(self.resume_dir))
            ckpt.restore_best(self.resume_dir, out, acc.is_main_process)
            acc.wait_for_everyone()
        self.logger = RunLogger(out, acc.is_main_process,
                                resume_step=self.state["global_step"] if self.resume_dir else None)

    def save_checkpoint(self) -> None:
        ckpt.save_checkpoint(self.accelerator, self.output_dir, self.state["global_step"], dict(self.state),
                             self.balancer.state_dict(), self.recipe.train.save_total_limit)

    # -- one optimizer step -----------------------------------------------------------------------
    def training_step(self, batch: dict) -> None:
        acc, cfg = self.accelerator, self.recipe.train
        tick = time.perf_counter()
        with acc.accumulate(self.model):
            outputs = self.balancer.forward(self.model, batch)
            loss, logs = self.balancer.loss(self.model, batch, outputs)
            aux = getattr(outputs, "aux_loss", None)
            if aux is not None:  # the model's own auxiliary objective (e.g. detached probes), under every method
                loss = loss + aux
                logs = {**logs, "aux_loss": aux.item()}
            acc.backward(loss)
            if acc.sync_gradients:
                self.balancer.after_backward(self.model, self.state["global_step"])
                if cfg.grad_clip:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad()
        self.step_seconds += time.perf_counter() - tick
        self.state["batches_done"] += 1
        if not acc.sync_gradients:
            return
        self.state["global_step"] += 1
        self.ctx.global_step = step = self.state["global_step"]
        self.progress.update(1)
        if step % cfg.log_every_steps == 0:
            mean_loss = acc.reduce(loss.detach().float(), reduction="mean").item()
            self.progress.set_postfix(loss=f"{mean_loss:.4f}")
            self.logger.log({"step": step, "epoch": self.ctx.epoch + 1, "split": "train", "loss": mean_loss,
                             "lr": self.scheduler.get_last_lr()[0], **logs})
        if cfg.save_steps and step % cfg.save_steps == 0:
            self.save_checkpoint()

    def _stop_requested(self) -> bool:
        max_steps = self.recipe.train.max_steps
        return max_steps is not None and self.state["global_step"] >= max_steps

    # -- evaluation and model choice ---------------------------------------------------------------
    def evaluate(self, loader, split: str) -> dict:
        return evaluate(self.model, loader, self.accelerator, self.data.modalities, self.data.num_classes,
                        shapley=self.recipe.train.shapley, unimodal=self.recipe.train.unimodal_metric,
                        probe_loader=self.train_eval_loader, seed=self.recipe.train.seed)

    def _is_better(self, value: float) -> bool:
        best = self.state["best_metric"]
        if best is None:
            return True
        lower = any(k in self.recipe.train.metric_for_best for k in LOWER_IS_BETTER)
        return value < best if lower else value > best

    def _validate_and_keep_best(self, epoch: int) -> None:
        metrics = self.evaluate(self.val_loader, "validation")
        key = self.recipe.train.metric_for_best
        if key not in metrics:
            raise ValueError(f"train.metric_for_best '{key}' is not a validation metric ({', '.join(metrics)})")
        self.logger.log({"step": self.state["global_step"], "epoch": epoch + 1, "split": "validation", **metrics})
        if self._is_better(metrics[key]):
            self.state.update(best_metric=metrics[key], best_step=self.state["global_step"], best_epoch=epoch + 1,
                              best_validation=metrics)
            best_dir = os.path.join(self.output_dir, "best")
            acc = self.accelerator
            acc.unwrap_model(self.model).save_pretrained(
                best_dir, is_main_process=acc.is_main_process, save_function=acc.save,
                state_dict=acc.get_state_dict(self.model), safe_serialization=True)
            acc.wait_for_everyone()

    def _load_best(self) -> None:
        path = os.path.join(self.output_dir, "best", "model.safetensors")
        state = load_file(path)
        model = self.accelerator.unwrap_model(self.model)
        if self.accelerator.distributed_type.name == "DEEPSPEED":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=0):
                model.load_state_dict(state)
        else:
            model.load_state_dict(state)

    # -- the run ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> bool:
        """One epoch of training with the method's epoch hooks (no evaluation, no checkpoint). Returns
        False when train.max_steps stopped it part-way."""
        acc, model = self.accelerator, self.model
        self.ctx.epoch = epoch
        model.train()
        resuming_mid_epoch = self.state["batches_done"] > 0
        if not resuming_mid_epoch:
            self.balancer.on_epoch_start(model, epoch)
        loader = self.balancer.train_loader(epoch) or self.train_loader
        loader.set_epoch(epoch)  # a new, seeded order every epoch, identical after a resume
        epoch_batches = len(loader)  # a data-stage method's loader may be longer than the default one
        if resuming_mid_epoch:
            loader = acc.skip_first_batches(loader, self.state["batches_done"])
        if self.balancer.train_epoch is not None:
            self.balancer.train_epoch(self, model, loader, epoch)
        else:
            for batch in loader:
                self.training_step(batch)
                if self._stop_requested():
                    break
        if self._stop_requested() and self.state["batches_done"] < epoch_batches:
            return False
        self.balancer.on_epoch_end(model, epoch)
        self.state["batches_done"] = 0  # the next epoch starts from its first batch
        return True

    def fit(self) -> dict | None:
        acc, cfg = self.accelerator, self.recipe.train
        for note in self.data.notes:
            acc.print(f"[mmbalance] {note}")
        self.progress = tqdm(total=cfg.epochs * self.steps_per_epoch, initial=self.state["global_step"],
                             disable=not (acc.is_main_process and cfg.progress), desc=self.balancer.name)
        stopped = False
        start_time, start_step, self.step_seconds = time.perf_counter(), self.state["global_step"], 0.0
        train_seconds = 0.0  # epochs' training work, the method's epoch hooks included; evaluation excluded
        for epoch in range(self.state["epoch"], cfg.epochs):
            tick = time.perf_counter()
            if not self.train_epoch(epoch):
                stopped = True
                break
            train_seconds += time.perf_counter() - tick
            if (epoch + 1) % cfg.eval_every_epochs == 0 or epoch + 1 == cfg.epochs:
                self._validate_and_keep_best(epoch)
            self.state.update(epoch=epoch + 1, batches_done=0)
            self.save_checkpoint()
            if self._stop_requested():
                stopped = epoch + 1 < cfg.epochs
                break
        self.progress.close()
        steps = self.state["global_step"] - start_step
        self.timing = {"wall_seconds": time.perf_counter() - start_time, "train_seconds": train_seconds, "steps": steps,
                       "step_seconds": self.step_seconds, "mean_step_seconds": self.step_seconds / max(1, steps)}
        if acc.is_main_process:  # kept out of final_metrics.json, which must be identical across reruns
            write_json_atomic(os.path.join(self.output_dir, "timing.json"), self.timing)
        if stopped:
            self.save_checkpoint()
            acc.print(f"[mmbalance] stopped at train.max_steps={cfg.max_steps}; resume with train.resume_from=latest")
            self.logger.close()
            return None
        return self.finish()

    def finish(self) -> dict:
        """Reload the best model, read the test split once, write final_metrics.json and the plots."""
        acc = self.accelerator
        self._load_best()
        final = {"validation": self.state["best_validation"]}
        if self.test_loader is not None:
            final["test"] = self.evaluate(self.test_loader, "test")
        final.update(method=self.balancer.name, seed=self.recipe.train.seed, best_step=self.state["best_step"],
                     best_epoch=self.state["best_epoch"], metric_for_best=self.recipe.train.metric_for_best,
                     world_size=acc.num_processes, distributed_type=acc.distributed_type.name)
        if acc.is_main_process:
            write_json_atomic(os.path.join(self.output_dir, "final_metrics.json"), final)
            if self.recipe.train.plots:
                from mmbalance_llm.eval.plots import plot_run

                plot_run(self.logger.path, os.path.join(self.output_dir, "curves.png"),
                         title=f"{self.balancer.name}: validation accuracy")
                if "attention" in (self.state["best_validation"] or {}):  # models with attention diagnostics
                    from mmbalance_llm.eval.attention_plots import plot_run_attention

                    plot_run_attention(self.logger.path, os.path.join(self.output_dir, "attention.png"),
                                       title=f"{self.balancer.name}: fusion-query attention")
        self.logger.close()
        acc.wait_for_everyone()
        return final


def train(recipe_or_path, overrides: list | None = None) -> dict | None:
    """Train from a Recipe, a recipe dict or a YAML path (with `dotted.key=value` overrides)."""
    recipe = recipe_or_path if isinstance(recipe_or_path, Recipe) else load_recipe(recipe_or_path, overrides)
    return Trainer(recipe).fit()
