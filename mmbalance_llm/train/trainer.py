"""The training loop, one for every task. Read it top to bottom: build, (resume), epochs of steps,
evaluate, report.

A task (train/tasks/: `classify`, `sft`) says what the data, the model and a batch are and how to evaluate
and save; a balancing method plugs in through the balancer hooks (balance/base.py) and sees a narrow
context, never this object. The loop owns the rest: accelerate, accumulation, clipping, the schedule,
the progress bar, `metrics.jsonl` + TensorBoard, checkpoints, resume, best-by-validation, test read once.
"""
from __future__ import annotations

import math
import os
import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from mmbalance_llm.balance import method_config
from mmbalance_llm.balance.base import TrainContext
from mmbalance_llm.config import Recipe, RecipeError, dump_recipe, load_recipe
from mmbalance_llm.train import checkpoint as ckpt
from mmbalance_llm.train.io import write_json_atomic
from mmbalance_llm.train.logger import RunLogger
from mmbalance_llm.train.setup import make_accelerator, make_optimizer, make_scheduler
from mmbalance_llm.train.tasks import make_task


class Trainer:
    """`Trainer(recipe, model=None, datasets=None).fit()`. `recipe`: a Recipe, a recipe dict or a YAML
    path; `model`: a model to train instead of the one the recipe builds; `datasets`: a
    `datasets.DatasetDict` (classify; or the `LoadedData` of `load_feature_data`, read already) or {split: list
    of chat records} (sft) instead of the recipe's files;
    `trackers`: Accelerate `GeneralTracker` objects to log to besides those of `train.report_to`."""

    def __init__(self, recipe, model=None, datasets=None, overrides: list | None = None, trackers=None):
        from accelerate.utils import set_seed
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # per-save "Writing model shards" bars drown the training bar
        if not isinstance(recipe, Recipe):
            recipe = load_recipe(recipe, overrides)
        self.recipe, cfg = recipe, recipe.train
        from mmbalance_llm.utils.threads import configure_threads

        self.num_threads = configure_threads(cfg.num_threads)  # measured: 1 thread per process is fastest here
        balancer_cls, balancer_config = method_config(recipe.balance)
        if recipe.task not in balancer_cls.tasks:
            raise RecipeError(f"balance.method '{balancer_cls.name}' supports task {', '.join(balancer_cls.tasks)}, "
                              f"not {recipe.task!r}")
        self.balancer = balancer_cls(balancer_config)
        self.task = task = make_task(recipe)
        self._check_eval_settings()
        from mmbalance_llm.train.logger import log_with, resolve_report_to

        trackers = log_with(resolve_report_to(cfg.report_to), recipe.output_dir, trackers or ())
        self.accelerator = acc = make_accelerator(
            cfg, balancer_cls.find_unused_parameters or task.find_unused_parameters, trackers, recipe.output_dir)
        # before any engine is built (DeepSpeed compiles for a minute on CPU)
        self.balancer.check_engine(acc, recipe.task)
        task.check_engine(acc)
        set_seed(cfg.seed)

        # Everything that can reject the input runs before the output folder is touched.
        if acc.is_main_process:
            task.prepare_assets()
        acc.wait_for_everyone()
        with acc.main_process_first():  # the main process fills the preprocessing cache; the others read it
            task.load_data(datasets)
        self.data = getattr(task, "data", None)  # classify: the loaded feature splits, for callers that inspect them
        # seeded again: the weights must not depend on whether the main process just built a tiny twin or
        # generated data (which draw from the same generators)
        set_seed(cfg.seed)
        model = task.build_model(self.balancer, model)
        self._check_metric_for_best()
        self.resume_dir = ckpt.resolve_resume(cfg.resume_from_checkpoint, recipe.output_dir)
        if self.resume_dir is not None:
            ckpt.check_checkpoint(self.resume_dir, acc.process_index)

        train_loader = self.make_loader(task.train_dataset, True, cfg.per_device_train_batch_size, task.collate)
        # Optimizer steps per epoch and process, as the prepared (sharded, even_batches) loader will give them.
        per_process_batches = math.ceil(len(train_loader) / acc.num_processes)
        self.steps_per_epoch = max(1, math.ceil(per_process_batches / cfg.gradient_accumulation_steps))
        self.total_steps = cfg.max_steps or cfg.num_train_epochs * self.steps_per_epoch
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)
        optimizer = make_optimizer(model, cfg)
        scheduler = make_scheduler(optimizer, cfg, self.steps_per_epoch, self.total_steps, acc.num_processes)
        self.model, self.optimizer, self.train_loader, self.scheduler = acc.prepare(
            model, optimizer, train_loader, scheduler)
        task.setup(acc, self.model, self.make_loader)
        from accelerate.optimizer import AcceleratedOptimizer

        plain = (type(self.optimizer) is AcceleratedOptimizer and self.optimizer.scaler is None
                 and acc.distributed_type.name in ("NO", "MULTI_CPU", "MULTI_GPU"))
        self._raw_optimizer = self.optimizer.optimizer if plain else None

        self.state = {"global_step": 0, "epoch": 0, "batches_done": 0, "best_metric": None, "best_step": None,
                      "best_epoch": None, "best_validation": None, "before_training": None,
                      "evals_since_best": 0, "early_stopped": False}
        self.ctx = TrainContext(
            accelerator=acc, modalities=task.modalities, num_classes=task.num_classes, recipe=recipe,
            loaders={"train": self.train_loader, **{k: v for k, v in getattr(task, "loaders", {}).items()
                                                   if k != "test"}},
            seed=cfg.seed, task=recipe.task, train_dataset=task.train_dataset, steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps, eval_batch_size=cfg.per_device_eval_batch_size,
            num_workers=cfg.dataloader_num_workers, resuming=self.resume_dir is not None, log=self._log,
            training_step=self.training_step, optimizer_step=self.optimizer_step,
            stop_requested=self.stop_requested, task_forward=task.forward, task_loss=task.loss,
            progress=self.state, set_lr_factors=self.set_lr_factors)
        if hasattr(task, "bind"):
            task.bind(self.ctx)
        self.balancer.setup(self.ctx, self.model)
        self.output_dir = recipe.output_dir
        self.step_seconds, self.progress = 0.0, tqdm(disable=True)  # fit() replaces the bar
        self.mid_eval_seconds = 0.0
        self._prepare_output_dir()

    def make_loader(self, dataset, shuffle: bool, batch_size: int, collate_fn) -> DataLoader:
        gen = torch.Generator().manual_seed(self.recipe.train.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, collate_fn=collate_fn,
                          num_workers=self.recipe.train.dataloader_num_workers)

    def _check_metric_for_best(self) -> None:
        key, names = self.recipe.train.metric_for_best_model, self.task.metric_names()
        if key not in names:
            raise RecipeError(f"recipe key 'train.metric_for_best_model' is {key!r}; task '{self.task.name}' "
                              f"reports {', '.join(names)}")

    def _check_eval_settings(self) -> None:
        cfg = self.recipe.train
        if cfg.early_stopping_patience and cfg.eval_strategy == "no":
            raise RecipeError("recipe key 'train.early_stopping_patience' needs evaluations during training; "
                              "train.eval_strategy is 'no'")
        if cfg.save_strategy == "steps" and not cfg.save_steps:
            raise RecipeError("recipe key 'train.save_strategy' is 'steps' but train.save_steps is not set")
        self.eval_steps = (cfg.eval_steps or cfg.logging_steps) if cfg.eval_strategy == "steps" else None

    # -- output folder, resume --------------------------------------------------------------------
    def _prepare_output_dir(self) -> None:
        acc, out = self.accelerator, self.output_dir
        if acc.is_main_process:
            self.lock = ckpt.lock_output_dir(out)
            ckpt.remove_incomplete(out)
            if self.resume_dir is None:  # a fresh run must not pick up an older run's outputs
                ckpt.clear_run(out)
            dump_recipe(self.recipe, os.path.join(out, "config.yaml"))
        acc.wait_for_everyone()
        if self.resume_dir is not None:
            acc.load_state(self.resume_dir)
            self.state.update(ckpt.load_trainer_state(self.resume_dir))
            self.balancer.load_state_dict(ckpt.load_balancer_state(self.resume_dir))
            ckpt.restore_best(self.resume_dir, out, acc.is_main_process)
            self.ctx.global_step, self.ctx.epoch = self.state["global_step"], self.state["epoch"]
            acc.wait_for_everyone()
        from mmbalance_llm.train.logger import hparams

        self.logger = RunLogger(out, acc.is_main_process,
                                resume_step=self.state["global_step"] if self.resume_dir else None,
                                accelerator=acc, config=hparams(self.recipe.to_dict()))

    def save_checkpoint(self) -> None:
        key = (self.state["global_step"], self.state["epoch"], self.state["batches_done"])
        if getattr(self, "_saved", None) == key:
            return  # this exact state is on disk already: never rewrite a checkpoint in place
        self._saved = key
        ckpt.save_checkpoint(self.accelerator, self.output_dir, self.state["global_step"], dict(self.state),
                             self.balancer.state_dict(), self.recipe.train.save_total_limit)

    def _log(self, row: dict) -> None:
        self.logger.log(row)

    def set_lr_factors(self, factors: dict) -> None:
        """Multiply the scheduled learning rate of each learner's parameter groups (`group["learner"]`, made by
        train/setup.py `learner_groups`) by its factor, from the next optimizer step on; unnamed groups keep 1.
        The factor applies to the group's base rate (`initial_lr`), so calling it again replaces, never compounds;
        the factored base is part of the optimizer / scheduler state, and a balancer re-applies its factors
        after a resume (TrainContext.set_lr_factors)."""
        sched = getattr(self.scheduler, "scheduler", self.scheduler)  # the LambdaLR inside accelerate's wrapper
        for i, group in enumerate(self.optimizer.param_groups):
            base = group.setdefault("initial_lr", group["lr"])  # LambdaLR sets it; a constant rate is its own base
            lr = base * float(factors.get(group.get("learner"), 1.0))
            if sched is not None:
                sched.base_lrs[i] = lr
                lr = lr * sched.lr_lambdas[i](sched.last_epoch)
            group["lr"] = lr

    # -- one optimizer step -----------------------------------------------------------------------
    def optimizer_step(self, batch: dict):
        """Forward, the method's loss, backward, gradient edits, clipping and the optimizer update (on the
        micro-batches where gradients sync). Returns (loss, logs). The schedule, the step counter and the
        logs are `training_step`'s."""
        acc, cfg = self.accelerator, self.recipe.train
        with acc.accumulate(self.model):
            outputs = self.balancer.forward(self.model, batch)
            loss, logs = self.balancer.loss(self.model, batch, outputs)
            extra = self.task.extra_loss(outputs)
            if extra is not None:  # the model's own auxiliary objective (e.g. detached probes), under every method
                loss = loss + extra
                logs = {**logs, "aux_loss": extra.item()}
            acc.backward(loss)
            if acc.sync_gradients:
                self.balancer.after_backward(self.model, self.state["global_step"])
                if cfg.max_grad_norm:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.max_grad_norm)
            if self._raw_optimizer is not None:
                # What AcceleratedOptimizer.step / zero_grad do here, without their per-step package look-ups
                # (lomo availability, inspect.signature): ~7% of a small model's step.
                if acc.sync_gradients:
                    self._raw_optimizer.step()
                    self._raw_optimizer.zero_grad(set_to_none=True)
            else:
                self.optimizer.step()
                self.optimizer.zero_grad()
        return loss, logs

    def training_step(self, batch: dict) -> None:
        """One micro-batch of training: `optimizer_step`, then the schedule, counters, logs and step checkpoints."""
        acc, cfg = self.accelerator, self.recipe.train
        tick = time.perf_counter()
        loss, logs = self.optimizer_step(batch)
        if self.scheduler is not None:
            self.scheduler.step()
        self.step_seconds += time.perf_counter() - tick
        self.state["batches_done"] += 1
        if not acc.sync_gradients:
            return
        self.state["global_step"] += 1
        self.ctx.global_step = step = self.state["global_step"]
        self.progress.update(1)
        if step % cfg.logging_steps == 0:
            mean_loss = acc.reduce(loss.detach().float(), reduction="mean").item()
            self.progress.set_postfix(loss=f"{mean_loss:.4f}")
            self.logger.log({"step": step, "epoch": self.ctx.epoch + 1, "split": "train", "loss": mean_loss,
                             "lr": self.optimizer.param_groups[0]["lr"], **logs})
        if self.eval_steps and step % self.eval_steps == 0:
            self._validate_mid_training()
        if cfg.save_steps and cfg.save_strategy != "no" and step % cfg.save_steps == 0 and not (
                cfg.save_strategy == "epoch" and self._epoch_ends_here()):
            self.save_checkpoint()

    def _validate_mid_training(self) -> None:
        """A step-level evaluation (train.eval_strategy='steps'); every module's train/eval mode is put back
        as it was (a method may keep parts of the model in eval mode)."""
        tick, modes = time.perf_counter(), [(m, m.training) for m in self.model.modules()]
        self._validate_and_keep_best(self.ctx.epoch + 1)
        for module, training in modes:
            module.train(training)
        self.mid_eval_seconds += time.perf_counter() - tick

    def _epoch_ends_here(self) -> bool:
        # The epoch-end checkpoint follows right after; writing the same checkpoint-N twice is avoided.
        return self.state["batches_done"] >= self._epoch_batches or self._at_max_steps()

    def _at_max_steps(self) -> bool:
        max_steps = self.recipe.train.max_steps
        return max_steps is not None and self.state["global_step"] >= max_steps

    def _completed(self) -> bool:
        """The run reached its end: early stopping, max_steps when set, else the last epoch."""
        if self.state.get("early_stopped"):
            return True
        if self.recipe.train.max_steps is not None:
            return self._at_max_steps()
        return self.state["epoch"] >= self.num_epochs

    def stop_requested(self) -> bool:
        stop = self.recipe.train.stop_after_steps
        return (self._at_max_steps() or (stop is not None and self.state["global_step"] >= stop)
                or bool(self.state.get("early_stopped")))

    # -- evaluation and model choice ---------------------------------------------------------------
    def evaluate(self, split: str) -> dict:
        return self.task.evaluate(self.model, split)

    def _is_better(self, metrics: dict) -> bool:
        key = self.recipe.train.metric_for_best_model
        best = self.state["best_validation"]
        if best is None:
            return True
        lower = any(k in key for k in self.task.lower_is_better)
        new, old = metrics[key], best[key]
        if new != old or self.task.tie_break is None:
            return new < old if lower else new > old
        return metrics[self.task.tie_break] < best[self.task.tie_break]

    def _validate_and_keep_best(self, epoch: int) -> None:
        metrics = self.evaluate("validation")
        key = self.recipe.train.metric_for_best_model
        self.logger.log({"step": self.state["global_step"], "epoch": epoch, "split": "validation", **metrics})
        self.accelerator.print(f"[mmbalance] epoch {epoch} step {self.state['global_step']} validation: "
                               f"{self.task.summary(metrics)}")
        self.state["evaluated_step"] = self.state["global_step"]
        if self._is_better(metrics):
            self.state.update(best_metric=metrics[key], best_step=self.state["global_step"], best_epoch=epoch,
                              best_validation=metrics, evals_since_best=0)
            self.task.save_best(self.accelerator, self.model, os.path.join(self.output_dir, "best"))
            self.balancer.save_pretrained(self.model, os.path.join(self.output_dir, "best"))
            self.accelerator.wait_for_everyone()
        else:
            self.state["evals_since_best"] = self.state.get("evals_since_best", 0) + 1
        patience = self.recipe.train.early_stopping_patience
        if patience and self.state["evals_since_best"] >= patience:
            self.state["early_stopped"] = True
            self.accelerator.print(f"[mmbalance] early stop: {patience} evaluations without a better "
                                   f"{key} (best {self.state['best_metric']:.4f} at epoch {self.state['best_epoch']})")
        return metrics

    # -- the run ----------------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> bool:
        """One epoch of training with the method's epoch hooks (no evaluation, no checkpoint). Returns
        False when the run stopped part-way (train.stop_after_steps or max_steps)."""
        acc, model = self.accelerator, self.model
        self.ctx.epoch = epoch
        model.train()
        resuming_mid_epoch = self.state["batches_done"] > 0
        if not resuming_mid_epoch:
            self.balancer.on_epoch_start(model, epoch)
        loader = self.balancer.train_loader(epoch) or self.train_loader
        loader.set_epoch(epoch)  # a new, seeded order every epoch, identical after a resume
        # a data-stage method's loader may be longer; a method that reorganises the epoch says how long it is
        self._epoch_batches = epoch_batches = self.balancer.epoch_length(loader, epoch)
        if resuming_mid_epoch:
            loader = acc.skip_first_batches(loader, self.state["batches_done"])
        if self.balancer.train_epoch is not None:
            self.balancer.train_epoch(model, loader, epoch)
        else:
            for batch in loader:
                self.training_step(batch)
                if self.stop_requested():
                    break
        if self.stop_requested() and self.state["batches_done"] < epoch_batches:
            return False
        self.balancer.on_epoch_end(model, epoch)
        self.state["batches_done"] = 0  # the next epoch starts from its first batch
        return True

    def fit(self) -> dict | None:
        acc, cfg = self.accelerator, self.recipe.train
        for note in self.task.notes:
            acc.print(f"[mmbalance] {note}")
        self.progress = tqdm(total=self.total_steps, initial=self.state["global_step"],
                             disable=not (acc.is_main_process and cfg.progress), desc=self.balancer.name)
        start_time, start_step, self.step_seconds = time.perf_counter(), self.state["global_step"], 0.0
        train_seconds = 0.0  # epochs' training work, the method's epoch hooks included; evaluation excluded
        if (self.task.eval_at_start and cfg.eval_strategy != "no" and self.state["global_step"] == 0
                and self.state["before_training"] is None):
            self.state["before_training"] = self._validate_and_keep_best(0)
        for epoch in range(self.state["epoch"], self.num_epochs):
            tick = time.perf_counter()
            finished_epoch = self.train_epoch(epoch)
            train_seconds += time.perf_counter() - tick - self.mid_eval_seconds
            self.mid_eval_seconds = 0.0
            done = self._at_max_steps()
            if not finished_epoch and not done:
                break  # stop_after_steps, or early stopping at a step-level evaluation, part-way through an epoch
            if self._evaluate_at_epoch_end(epoch + 1, done):
                self._validate_and_keep_best(epoch + 1)
            self.state.update(epoch=epoch + 1, batches_done=0)
            if cfg.save_strategy == "epoch":
                self.save_checkpoint()
            if done or self.stop_requested() or self.state["early_stopped"]:
                break
        self.progress.close()
        steps = self.state["global_step"] - start_step
        self.timing = {"wall_seconds": time.perf_counter() - start_time, "train_seconds": train_seconds, "steps": steps,
                       "step_seconds": self.step_seconds, "mean_step_seconds": self.step_seconds / max(1, steps)}
        if acc.is_main_process:  # kept out of final_metrics.json, which must be identical across reruns
            write_json_atomic(os.path.join(self.output_dir, "timing.json"), self.timing)
        if not self._completed():
            self.save_checkpoint()
            acc.print(f"[mmbalance] stopped at step {self.state['global_step']} (train.stop_after_steps="
                      f"{cfg.stop_after_steps}); continue with train.resume_from_checkpoint=latest")
            self._close()
            return None
        return self.finish()

    def _evaluate_at_epoch_end(self, epoch: int, done: bool) -> bool:
        """Evaluate at this epoch's end? 'epoch': every eval_every_epochs and at the end of training; 'steps' and
        'no': only at the end of training, unless a step-level evaluation just saw this very model."""
        cfg, last = self.recipe.train, done or epoch == self.num_epochs
        if cfg.eval_strategy == "epoch":
            return epoch % cfg.eval_every_epochs == 0 or last
        return last and self.state.get("evaluated_step") != self.state["global_step"]

    def finish(self) -> dict:
        """Reload the best model, read the test split once, write final_metrics.json and the plots."""
        acc = self.accelerator
        self.task.load_best(acc, self.model, os.path.join(self.output_dir, "best"))
        self.balancer.load_pretrained(self.model, os.path.join(self.output_dir, "best"))
        final = {"validation": self.state["best_validation"]}
        if self.task.has_split("test"):
            final["test"] = self.evaluate("test")
        final.update(task=self.recipe.task, method=self.balancer.name, seed=self.recipe.train.seed,
                     best_step=self.state["best_step"], best_epoch=self.state["best_epoch"],
                     metric_for_best=self.recipe.train.metric_for_best_model, world_size=acc.num_processes,
                     distributed_type=acc.distributed_type.name)
        if self.state["before_training"] is not None:
            final["validation_before_training"] = self.state["before_training"]
        if self.recipe.task == "classify":  # did the chosen checkpoint see the method at all? (eval/activity.py)
            from mmbalance_llm.eval.activity import active_at, first_active_epoch

            b, epochs = self.recipe.balance, self.num_epochs
            final["first_active_epoch"] = first_active_epoch(self.balancer.name, b, epochs)
            final["active_at_best_epoch"] = active_at(self.balancer.name, b, self.state["best_epoch"], epochs)
        final.update(self.task.final_extras(self.model))
        if self.state.get("early_stopped"):
            final["early_stopped_at_epoch"] = self.state["epoch"] + (1 if self.state["batches_done"] else 0)
            final["early_stopped_at_step"] = self.state["global_step"]
        if "test" in final:  # test metrics reach the trackers (not metrics.jsonl: that is the training log)
            self.logger.log_trackers({"test": final["test"]}, self.state["global_step"])
        if acc.is_main_process:
            write_json_atomic(os.path.join(self.output_dir, "final_metrics.json"), final)
            from mmbalance_llm.train.model_card import write_model_card

            write_model_card(os.path.join(self.output_dir, "best"), self.recipe, final)
            if self.recipe.train.plots:
                self.task.plots(self.output_dir, self.logger.path, self.state, self.balancer.name)
        self._close()
        acc.wait_for_everyone()
        return final

    def _close(self) -> None:
        self.logger.close()
        lock = getattr(self, "lock", None)
        if lock is not None:
            lock.release()


def train(recipe_or_path, overrides: list | None = None, model=None, datasets=None) -> dict | None:
    """Train from a Recipe, a recipe dict or a YAML path (with `dotted.key=value` overrides)."""
    return Trainer(recipe_or_path, model=model, datasets=datasets, overrides=overrides).fit()
