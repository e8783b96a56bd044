"""Task `classify`: multimodal classifiers on feature datasets (data/features.py), metrics of eval/evaluator.py."""
from __future__ import annotations

import os

from mmbalance_llm.balance.base import classify_forward, classify_loss
from mmbalance_llm.train.tasks.base import Task

METRICS = ("accuracy", "macro_f1", "imbalance", "accuracy_no_modality")


class ClassifyTask(Task):
    name = "classify"

    def load_data(self, datasets=None) -> None:
        from mmbalance_llm.data.features import LoadedData, load_feature_data

        r = self.recipe
        if isinstance(datasets, LoadedData):  # read and validated already (mmbalance compare shares one read)
            self.data = datasets
        else:
            self.data = load_feature_data(r.data, r.model.num_classes, seed=r.train.seed, datasets=datasets)
        self.modalities, self.num_classes = self.data.modalities, self.data.num_classes
        self.train_dataset = self.data.train
        self.notes = list(self.data.notes)

    def build_model(self, balancer, model=None):
        if model is None:
            model = balancer.build_model(self.recipe.model, self.modalities, self.data.input_shapes, self.num_classes)
        if self.recipe.model.gradient_checkpointing:
            from mmbalance_llm.config import RecipeError
            from mmbalance_llm.models.media_encoders import enable_gradient_checkpointing

            if not enable_gradient_checkpointing(model):
                raise RecipeError("recipe key 'model.gradient_checkpointing' is true but the model has no Hugging Face "
                                  "encoder that supports it (encoder: hf)")
        return model

    def metric_names(self) -> list:
        return list(METRICS)

    def collate(self, items):
        from mmbalance_llm.data.features import collate

        return collate(items)

    def setup(self, accelerator, model, make_loader) -> None:
        super().setup(accelerator, model)
        bs = self.recipe.train.per_device_eval_batch_size
        self.loaders = {
            "validation": accelerator.prepare(make_loader(self.data.validation, False, bs, self.collate)),
            "train_eval": accelerator.prepare(make_loader(self.data.train, False, bs, self.collate)),
        }
        if self.data.test is not None:
            self.loaders["test"] = accelerator.prepare(make_loader(self.data.test, False, bs, self.collate))

    def has_split(self, split: str) -> bool:
        return split in self.loaders

    # -- a step ------------------------------------------------------------------------------------
    def bind(self, ctx) -> None:
        self.ctx = ctx

    def forward(self, model, batch):
        return classify_forward(self.ctx, model, batch)

    def loss(self, batch, outputs):
        return classify_loss(batch, outputs)

    def extra_loss(self, outputs):
        return getattr(outputs, "aux_loss", None)

    # -- evaluation and saving ---------------------------------------------------------------------
    def evaluate(self, model, split: str) -> dict:
        from mmbalance_llm.eval.evaluator import evaluate

        t = self.recipe.train
        return evaluate(model, self.loaders[split], self.accelerator, self.modalities, self.num_classes,
                        shapley=t.shapley, unimodal=t.unimodal_metric, probe_loader=self.loaders["train_eval"],
                        seed=t.seed)

    def summary(self, metrics: dict) -> str:
        line = super().summary(metrics)
        uni = metrics.get("unimodal_accuracy") or {}
        if uni:
            line += ", unimodal " + " ".join(f"{m} {v:.4f}" for m, v in uni.items())
        return line

    def save_best(self, accelerator, model, path: str) -> None:
        accelerator.unwrap_model(model).save_pretrained(
            path, is_main_process=accelerator.is_main_process, save_function=accelerator.save,
            state_dict=accelerator.get_state_dict(model), safe_serialization=True)

    def load_best(self, accelerator, model, path: str) -> None:
        from safetensors.torch import load_file

        state = load_file(os.path.join(path, "model.safetensors"))
        net = accelerator.unwrap_model(model)
        if accelerator.distributed_type.name == "DEEPSPEED":
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(net.parameters()), modifier_rank=0):
                net.load_state_dict(state)
        else:
            net.load_state_dict(state)

    def plots(self, output_dir: str, metrics_path: str, state: dict, title: str) -> None:
        from mmbalance_llm.eval.plots import plot_run

        plot_run(metrics_path, os.path.join(output_dir, "curves.png"), title=f"{title}: validation accuracy")
        if "attention" in (state.get("best_validation") or {}):  # models with attention diagnostics
            from mmbalance_llm.eval.attention_plots import plot_run_attention

            plot_run_attention(metrics_path, os.path.join(output_dir, "attention.png"),
                               title=f"{title}: fusion-query attention")
