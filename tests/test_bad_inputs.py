"""The bad-input catalogue: every input a user can get wrong is refused with exit 2 and one line
(`mmbalance: error: ...`) naming the field, file or row, before anything is written — an earlier good run
in the same output_dir stays byte-identical (sha256 of every file)."""
import importlib.util
import json
import os

import pytest

from mmbalance_llm.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = os.path.join(ROOT, "recipes", "synthetic", "baseline.yaml")
SFT = os.path.join(ROOT, "recipes", "llava", "moka_sft_tiny.yaml")

# (id, overrides on the classifier recipe, expected text)
RECIPE = [
    ("epochs-abc", ["train.epochs=abc"], "'train.epochs' must be an integer"),
    ("epochs-0", ["train.num_train_epochs=0"], "'train.num_train_epochs' must be >= 1"),
    ("epochs-neg", ["train.epochs=-3"], "'train.epochs' must be >= 1"),
    ("epochs-float", ["train.epochs=1.5"], "'train.epochs' must be an integer"),
    ("batch-0", ["train.batch_size=0"], "'train.batch_size' must be >= 1"),
    ("batch-str", ["train.per_device_train_batch_size=big"], "must be an integer"),
    ("eval-batch-0", ["train.eval_batch_size=0"], "'train.eval_batch_size' must be >= 1"),
    ("lr-neg", ["train.lr=-1"], "'train.lr' must be > 0.0"),
    ("lr-zero", ["train.learning_rate=0"], "'train.learning_rate' must be > 0.0"),
    ("lr-str", ["train.lr=fast"], "'train.lr' must be a number"),
    ("lr-inf", ["train.lr=.inf"], "'train.lr' must be a number"),
    ("wd-neg", ["train.weight_decay=-0.1"], "'train.weight_decay' must be >= 0.0"),
    ("momentum-2", ["train.momentum=2"], "'train.momentum' must be <= 1.0"),
    ("scheduler", ["train.scheduler=bogus"], "'train.scheduler' is 'bogus'; choose one of"),
    ("optimizer", ["train.optimizer=adam"], "'train.optimizer' is 'adam'; choose one of adamw, sgd"),
    ("warmup-neg", ["train.warmup_steps=-1"], "'train.warmup_steps' must be >= 0"),
    ("warmup-ratio", ["train.warmup_ratio=2"], "'train.warmup_ratio' must be <= 1.0"),
    ("gamma-neg", ["train.gamma=-1"], "'train.gamma' must be >= 0.0"),
    ("grad-clip-neg", ["train.grad_clip=-1"], "'train.grad_clip' must be > 0.0"),
    ("grad-clip-0", ["train.max_grad_norm=0"], "'train.max_grad_norm' must be > 0.0"),
    ("accum-0", ["train.grad_accum=0"], "'train.grad_accum' must be >= 1"),
    ("precision", ["train.mixed_precision=fp8"], "'train.mixed_precision' is 'fp8'"),
    ("eval-every-0", ["train.eval_every_epochs=0"], "'train.eval_every_epochs' must be >= 1"),
    ("save-steps-0", ["train.save_steps=0"], "'train.save_steps' must be >= 1"),
    ("save-steps-neg", ["train.save_steps=-1"], "'train.save_steps' must be >= 1"),
    ("save-limit-0", ["train.save_total_limit=0"], "'train.save_total_limit' must be >= 1"),
    ("metric-bogus", ["train.metric_for_best=bogus"], "'train.metric_for_best_model' is 'bogus'"),
    ("max-steps-0", ["train.max_steps=0"], "'train.max_steps' must be >= 1"),
    ("stop-after-0", ["train.stop_after_steps=0"], "'train.stop_after_steps' must be >= 1"),
    ("unimodal-metric", ["train.unimodal_metric=x"], "'train.unimodal_metric' is 'x'"),
    ("shapley-str", ["train.shapley=maybe"], "'train.shapley' must be true or false"),
    ("logging-0", ["train.log_every_steps=0"], "'train.log_every_steps' must be >= 1"),
    ("progress-int", ["train.progress=3"], "'train.progress' must be true or false"),
    ("threads-0", ["train.num_threads=0"], "'train.num_threads' must be >= 1"),
    ("eval-steps-0", ["train.eval_steps=0"], "'train.eval_steps' must be >= 1"),
    ("eval-strategy", ["train.eval_strategy=bogus"], "'train.eval_strategy' is 'bogus'; choose one of epoch, steps, no"),
    ("save-strategy", ["train.save_strategy=always"], "'train.save_strategy' is 'always'"),
    ("save-strategy-steps", ["train.save_strategy=steps"], "'train.save_strategy' is 'steps' but train.save_steps"),
    ("patience-no-eval", ["train.eval_strategy=no", "train.early_stopping_patience=2"], "needs evaluations"),
    ("report-to", ["train.report_to=tensorbord"], "'train.report_to' is 'tensorbord'; choose one of tensorboard"),
    ("report-to-list", ["train.report_to=[tensorboard, neptun]"], "'train.report_to' is 'neptun'"),
    ("report-to-none-mixed", ["train.report_to=[none, tensorboard]"], "'none' cannot be combined"),
    ("workers-neg", ["train.num_workers=-1"], "'train.num_workers' must be >= 0"),
    ("seed-neg", ["train.seed=-1"], "'train.seed' must be >= 0"),
    ("seed-null", ["train.seed=null"], "'train.seed' must be set"),
    ("resume-missing", ["train.resume_from=/nonexistent/ckpt"], "'/nonexistent/ckpt' is not a complete checkpoint"),
    ("unknown-train-key", ["train.epochz=3"], "unknown recipe key 'train.epochz' (did you mean 'epochs'?)"),
    ("hf-spelling", ["train.num_train_epoch=3"], "(did you mean 'num_train_epochs'?)"),
    ("unknown-section", ["trian.lr=1"], "unknown recipe key 'trian'"),
    ("feature-dim-0", ["model.feature_dim=0"], "'model.feature_dim' must be >= 1"),
    ("hidden-dim-0", ["model.hidden_dim=0"], "'model.hidden_dim' must be >= 1"),
    ("layers-0", ["model.num_layers=0"], "'model.num_layers' must be >= 1"),
    ("heads-0", ["model.num_heads=0"], "'model.num_heads' must be >= 1"),
    ("dropout-big", ["model.dropout=1.5"], "'model.dropout' must be <= 0.999"),
    ("fusion", ["model.fusion=concatt"], "'model.fusion' is 'concatt'"),
    ("encoder", ["model.encoder=cnn"], "'model.encoder' is 'cnn'"),
    ("classes-1", ["model.num_classes=1"], "'model.num_classes' must be >= 2"),
    ("fusion-layers-0", ["model.fusion_layers=0"], "'model.fusion_layers' must be >= 1"),
    ("encoders-not-map", ["model.encoders=3"], "'model.encoders' must be a mapping"),
    ("model-section-list", ["model=[1, 2]"], "recipe section 'model' must be a mapping"),
    ("data-missing", ["data.path=/nonexistent/data"], "data.path '/nonexistent/data' does not exist"),
    ("data-modality", ["data.modalities=[audio, video]"], "column 'video' is missing"),
    ("label-column", ["data.label_column=nolabel"], "column 'nolabel' is missing"),
    ("train-split", ["data.train_split=nosplit"], "split 'nosplit' not found"),
    ("method-bogus", ["balance.method=ogm_gee"], "unknown balance.method 'ogm_gee' (did you mean 'ogm_ge'?)"),
    ("sft-method", ["balance.method=mllm_ogm"], "balance.method 'mllm_ogm' supports task sft"),
    ("alpha-neg", ["balance.method=ogm_ge", "balance.alpha=-1"], "'balance.alpha' of method 'ogm_ge' must be >= 0.0"),
    ("alpha-str", ["balance.method=ogm_ge", "balance.alpha=abc"], "'balance.alpha' of method 'ogm_ge' must be a number"),
    ("hp-unknown", ["balance.method=ogm_ge", "balance.alpah=1"], "unknown hyperparameter 'balance.alpah'"),
    ("hp-for-none", ["balance.weight=1"], "unknown hyperparameter 'balance.weight' for method 'none'"),
    ("pmr-momentum", ["balance.method=pmr", "balance.momentum=2"], "'balance.momentum' of method 'pmr' must be <= 1.0"),
    ("cml-lam", ["balance.method=cml", "balance.lam=-1"], "'balance.lam' of method 'cml' must be >= 0.0"),
    ("opm-q", ["balance.method=opm", "balance.q_base=2"], "'balance.q_base' of method 'opm' must be <= 1.0"),
    ("mla-a0", ["balance.method=mla", "balance.a0=0"], "'balance.a0' of method 'mla' must be > 0.0"),
    ("reconboost-t", ["balance.method=reconboost", "balance.t_epochs=0"], "'balance.t_epochs' of method 'reconboost'"),
    ("relearning-epoch", ["balance.method=relearning", "balance.reinit_epoch=0"], "'balance.reinit_epoch'"),
    ("inforeg-window", ["balance.method=inforeg", "balance.window=0"], "'balance.window' of method 'inforeg'"),
    ("mmcosine-scale", ["balance.method=mmcosine", "balance.scale=0"], "'balance.scale' of method 'mmcosine'"),
    ("gblending-super", ["balance.method=gblending", "balance.super_epoch=0"], "'balance.super_epoch'"),
    ("lfm-alpha-min", ["balance.method=lfm", "balance.alpha_min=2"], "'balance.alpha_min' of method 'lfm'"),
    ("greedy-window", ["balance.method=greedy", "balance.window_size=0"], "'balance.window_size' of method 'greedy'"),
    ("rollingq-r", ["balance.method=rollingq", "balance.r_time=-1"], "'balance.r_time' of method 'rollingq'"),
    ("valuation-part", ["balance.method=modality_valuation", "balance.part_ratio=2"], "'balance.part_ratio'"),
    ("mla-accum", ["balance.method=mla", "train.grad_accum=2"], "balance.method 'mla' takes one optimizer step"),
    ("split-head", ["balance.method=ogm_ge", "model.fusion=gated"], "needs split unimodal logits"),
    ("balance-list", ["balance=[1]"], "recipe section 'balance' must be a mapping"),
    ("task-bogus", ["task=regress"], "recipe key 'task' is 'regress'"),
    ("adapter-on-classify", ["adapter=moka"], "recipe key 'adapter' belongs to task 'sft'"),
    ("eval-on-classify", ["eval.accuracy=options"], "recipe key 'eval' belongs to task 'sft'"),
    ("output-dir-empty", ["output_dir="], "recipe key 'output_dir' must be a folder path"),
    ("override-no-equals", ["train.lr"], "override 'train.lr' is not of the form dotted.key=value"),
    ("override-empty-part", ["train..lr=1"], "override 'train..lr=1' has an empty key part"),
    ("override-bad-yaml", ["train.lr=[1"], "override 'train.lr=[1': value is not valid YAML"),
    ("override-into-value", ["output_dir.x=1"], "override 'output_dir.x=1': 'output_dir' is not a section"),
]

# a tracker whose package is not installed here (refused before the output folder is touched)
_MISSING = next((n for n in ("comet_ml", "aim", "swanlab", "wandb", "mlflow") if importlib.util.find_spec(n) is None),
                None)
if _MISSING:
    RECIPE.append(("report-to-missing", [f"train.report_to=[tensorboard, {_MISSING}]"],
                   f"train.report_to '{_MISSING}': the package {_MISSING} is not installed"))

SFT_CASES = [
    ("sft-adapter", ["adapter=dora"], "recipe key 'adapter' is 'dora'; choose one of moka, imod, lora, none"),
    ("sft-adapter-field", ["adapter_config.lora_alph=4"], "adapter_config.lora_alph' for MokaConfig"),
    ("sft-model-missing", ["model.name_or_path=./no/such/model", "model.build_tiny=null"], "is not a folder"),
    ("sft-model-null", ["model.name_or_path=null"], "'model.name_or_path' is required"),
    ("sft-freeze-str", ["model.freeze.tower=maybe"], "'model.freeze.tower' must be true or false"),
    ("sft-freeze-unknown", ["model.freeze.vision=true"], "unknown recipe key 'model.freeze.vision'"),
    ("sft-lm-unfrozen", ["model.freeze.language_model=false"], "would train the whole LLM"),
    ("sft-train-missing", ["data.train=null"], "'data.train' is required"),
    ("sft-accuracy", ["eval.accuracy=exact"], "'eval.accuracy' is 'exact'"),
    ("sft-new-tokens", ["eval.max_new_tokens=0"], "'eval.max_new_tokens' must be >= 1"),
    ("sft-dtype", ["model.dtype=float8"], "'model.dtype' is 'float8'"),
    ("sft-attn", ["model.attn_implementation=fast"], "'model.attn_implementation' is 'fast'"),
    ("sft-max-length", ["data.max_length=0"], "'data.max_length' must be >= 8"),
    ("sft-classic-method", ["balance.method=ogm_ge"], "balance.method 'ogm_ge' supports task classify"),
    ("sft-generate-key", ["data.generate.n_trian=3"], "unknown recipe key 'data.generate.n_trian'"),
    ("sft-model-section", ["model.feature_dim=8"], "unknown recipe key 'model.feature_dim'"),
    ("sft-video-fps", ["data.video_fps=0"], "'data.video_fps' must be > 0.0"),
    ("sft-contrast-weight", ["balance.method=mllm_contrast", "balance.weight=-1"], "'balance.weight' of method"),
]


from conftest import tree_digest as digest  # noqa: E402


@pytest.fixture(scope="module")
def good_run(tiny_data, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("catalogue") / "run")
    common = [f"data.path={tiny_data()}", f"output_dir={out}", "train.epochs=1", "train.progress=false",
              "model.hidden_dim=16", "model.feature_dim=8", "model.num_layers=1"]
    assert main(["train", BASE, *common]) == 0
    return out, common


def refused(capsys, argv, expected, folder):
    before = digest(folder)
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, argv
    lines = [e for e in err if e.startswith("mmbalance: error:")]
    assert len(lines) == 1, err
    assert expected in lines[0], lines[0]
    assert digest(folder) == before  # the earlier run is untouched


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in RECIPE], ids=[c[0] for c in RECIPE])
def test_bad_classifier_recipe_values(good_run, capsys, overrides, expected):
    out, common = good_run
    refused(capsys, ["train", BASE, *common, *overrides], expected, out)


@pytest.mark.parametrize("overrides, expected", [c[1:] for c in SFT_CASES], ids=[c[0] for c in SFT_CASES])
def test_bad_sft_recipe_values(good_run, capsys, overrides, expected):
    out, _ = good_run
    refused(capsys, ["train", SFT, f"output_dir={out}", *overrides], expected, out)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_bad_recipe_files(good_run, capsys, tmp_path):
    out, _ = good_run
    cases = [
        (str(tmp_path / "missing.yaml"), "recipe file"),
        (_write(tmp_path / "list.yaml", "- a\n- b\n"), "must hold a mapping of sections, got a list"),
        (_write(tmp_path / "bad.yaml", "train: {lr: [1\n"), "is not valid YAML"),
        (str(tmp_path), "does not exist"),
        (_write(tmp_path / "scalar.yaml", "3\n"), "must hold a mapping of sections, got a int"),
    ]
    for path, expected in cases:
        refused(capsys, ["train", path], expected, out)


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("case, expected", [
    ("nan", "split 'train', column 'audio', row 1: contains NaN or inf"),
    ("ragged", "split 'train', column 'audio', row 2: ragged array"),
    ("label", "split 'train', column 'label', row 3: label 9 is outside"),
    ("string", "split 'train', column 'audio'"),
    ("negative-label", "split 'train', column 'label', row 0: negative label"),
    ("missing-column", "split 'validation': column 'visual' is missing"),
])
def test_bad_feature_data_names_split_column_and_row(good_run, capsys, tmp_path, case, expected):
    out, common = good_run
    rows = [{"audio": [0.1 * i, 0.2], "visual": [0.3, 0.1 * i], "label": i % 2} for i in range(8)]
    val = [dict(r) for r in rows]
    if case == "nan":
        rows[1]["audio"] = [float("nan"), 0.0]
    elif case == "ragged":
        rows[2]["audio"] = [0.1, 0.2, 0.3]
    elif case == "label":
        rows[3]["label"] = 9
        common = [*common, "model.num_classes=2"]
    elif case == "string":
        rows[4]["audio"] = "loud"
    elif case == "negative-label":
        rows[0]["label"] = -1
    elif case == "missing-column":
        val = [{k: v for k, v in r.items() if k != "visual"} for r in val]
    data = tmp_path / "data"
    _jsonl(data / "train.jsonl", rows)
    _jsonl(data / "validation.jsonl", val)
    refused(capsys, ["train", BASE, *common, f"data.path={data}"], expected, out)


def test_filesystem_and_checkpoint_mistakes(good_run, capsys, tmp_path, tiny_data):
    from mmbalance_llm.train.checkpoint import OutputLock

    out, common = good_run
    base = [c for c in common if not c.startswith("output_dir=")]
    a_file = _write(tmp_path / "not_a_dir", "x")
    refused(capsys, ["train", BASE, *base, f"output_dir={a_file}"], "not_a_dir", out)
    empty = tmp_path / "empty"
    empty.mkdir()
    refused(capsys, ["train", BASE, *base, f"output_dir={empty}", "train.resume_from=latest"],
            "has no complete checkpoint-N folder", out)
    # a tampered RNG file in the latest checkpoint: refused by name, not skipped
    import glob

    latest = sorted(glob.glob(os.path.join(out, "checkpoint-*")), key=lambda d: int(d.rsplit("-", 1)[1]))[-1]
    rng = os.path.join(latest, "random_states_0.pkl")
    original = open(rng, "rb").read()
    try:
        open(rng, "wb").write(b"tampered")
        refused(capsys, ["train", BASE, *common, "train.resume_from=latest"], "random_states_0.pkl' is corrupt", out)
    finally:
        open(rng, "wb").write(original)
    lock = OutputLock(out)
    try:
        refused(capsys, ["train", BASE, *common], f"is in use by another run (PID {os.getpid()})", out)
    finally:
        lock.release()


def test_bad_saved_models_and_benchmark_files(good_run, capsys, tmp_path, tiny_data):
    out, _ = good_run
    refused(capsys, ["eval", str(tmp_path / "nope"), "--data", tiny_data()], "nope", out)
    torn = tmp_path / "torn"
    import shutil

    shutil.copytree(os.path.join(out, "best"), torn)
    with open(torn / "model.safetensors", "r+b") as fh:
        fh.truncate(100)
    refused(capsys, ["eval", str(torn), "--data", tiny_data()], "model.safetensors", out)


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from mmbalance_llm.models.tiny import build_tiny

    path = tmp_path_factory.mktemp("twin") / "llava"
    build_tiny("llava", str(path))
    return str(path)


def _chat(tmp_path, records, name="train.json"):
    from PIL import Image

    folder = tmp_path / "chat"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (8, 8), (200, 30, 30)).save(folder / "red.png")
    (folder / name).write_text(json.dumps(records))
    return str(folder / name)


GOOD_CHAT = {"id": "a", "messages": [{"role": "user", "content": "<image>What colour?"},
                                     {"role": "assistant", "content": "red"}], "images": ["red.png"]}


@pytest.mark.parametrize("record, expected", [
    ({**GOOD_CHAT, "images": ["missing.png"]}, "sample 0 (id=a)"),
    ({**GOOD_CHAT, "images": []}, "1 <image> placeholder(s) but 0 image(s)"),
    ({**GOOD_CHAT, "messages": [{"role": "robot", "content": "hi"}, {"role": "assistant", "content": "x"}]},
     "message 0 has role 'robot'"),
    ({**GOOD_CHAT, "messages": [{"role": "user", "content": "<image>hi"}]}, "turns must alternate"),
    ({"id": "b", "text": "no conversation"}, "needs 'messages'"),
    ({**GOOD_CHAT, "videos": [["red.png"]], "messages": [{"role": "user", "content": "<image><video>?"},
                                                         {"role": "assistant", "content": "red"}]},
     "takes no video"),
])
def test_bad_chat_data_names_file_and_sample(good_run, capsys, tmp_path, tiny_llava, record, expected):
    out, _ = good_run
    train = _chat(tmp_path, [record])
    val = _chat(tmp_path, [GOOD_CHAT], "validation.json")
    refused(capsys, ["train", SFT, f"output_dir={out}", f"model.name_or_path={tiny_llava}", "model.build_tiny=null",
                     f"data.train={train}", f"data.validation={val}", "data.test=null", "data.generate=null",
                     f"data.cache_dir={tmp_path / 'cache'}"], expected, out)


def test_bad_adapter_and_benchmark_files(good_run, capsys, tmp_path, tiny_llava):
    out, _ = good_run
    # an adapter folder whose weights are truncated
    import peft

    from mmbalance_llm.models.tiny import load_tiny

    base, _ = load_tiny(tiny_llava)
    adapter = tmp_path / "adapter"
    peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    with open(adapter / "adapter_model.safetensors", "r+b") as fh:
        fh.truncate(50)
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    row = {"question_id": 1, "image": "a.png", "text": "Is there a cat?", "label": "yes"}
    good = tmp_path / "pope.jsonl"
    good.write_text(json.dumps(row) + "\n")
    outside = tmp_path / "bench" / "pope.jsonl"
    outside.parent.mkdir()
    outside.write_text(json.dumps({**row, "image": "../a.png"}) + "\n")
    bad_label = tmp_path / "bad_label.jsonl"
    bad_label.write_text(json.dumps({**row, "label": "maybe"}) + "\n")
    refused(capsys, ["reliance", "--model", str(tmp_path / "no_model"), "--benchmark", str(good)], "no_model", out)
    refused(capsys, ["reliance", "--model", tiny_llava, "--benchmark", str(tmp_path / "missing.tsv")], "missing.tsv", out)
    refused(capsys, ["reliance", "--model", tiny_llava, "--benchmark", str(outside)], "outside", out)
    refused(capsys, ["reliance", "--model", tiny_llava, "--benchmark", str(bad_label)], "field 'label' must be yes/no", out)
    refused(capsys, ["reliance", "--model", str(adapter), "--benchmark", str(good)], "adapter_model.safetensors", out)
