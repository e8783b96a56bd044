"""The `mmbalance` command (also `python -m mmbalance_llm`).

    mmbalance train RECIPE [dotted.key=value ...]   (RECIPE --help: the keys of its task)
    mmbalance compare [--recipes DIR | --recipe R] [--methods a,b] [--seeds 0,1,2] [--jobs N] [--data PATH] [key=value ...]
    mmbalance eval MODEL_DIR --data PATH [--split test]
    mmbalance make-data synthetic OUT_DIR [--preset P] [--modality name:dim=32,snr=2,encoding=linear ...]
    mmbalance make-data mm-instruct OUT_DIR [--modalities image,audio] [--format sharegpt|llava] [--text-prior 0.8]
    mmbalance make-data tiny-model {llava,qwen2_vl,qwen2_5_vl,qwen2_audio,all} OUT_DIR
    mmbalance make-data diagnostic OUT_DIR         (reliance benchmark with ground truth, all formats)
    mmbalance make-data from-arrays OUT_DIR --input FILE.npz|csv|parquet [--view NAME=SPEC ...] [--label y]
    mmbalance make-data {cremad,kinetics-sounds,ave,vggsound,ucf101,food101,mosei} RAW_DIR OUT  (raw datasets)
    mmbalance make-data raw-replica {cremad,...,all} OUT   (miniature raw layouts for tests)
    mmbalance attribute --model PATH --data PATH  (token-level modality attribution: JSON + HTML + PNG)
    mmbalance reliance --model PATH --benchmark FILE
    mmbalance methods
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys


# Commands whose own module parses the rest of the command line: (words) -> "module:function(argv)".
DELEGATED = {
    ("make-data", "mm-instruct"): "mmbalance_llm.data.mm_synthetic:main",
    ("make-data", "tiny-model"): "mmbalance_llm.models.tiny:main",
    ("make-data", "diagnostic"): "mmbalance_llm.data.diagnostic:main",
    ("make-data", "from-arrays"): "mmbalance_llm.data.from_arrays:main",
    ("make-data", "raw-replica"): "mmbalance_llm.data.raw_replica:main",
    ("make-data", "cremad"): "mmbalance_llm.data.raw_converters:cremad_main",
    ("make-data", "kinetics-sounds"): "mmbalance_llm.data.raw_converters:kinetics_sounds_main",
    ("make-data", "ave"): "mmbalance_llm.data.raw_converters:ave_main",
    ("make-data", "vggsound"): "mmbalance_llm.data.raw_converters:vggsound_main",
    ("make-data", "ucf101"): "mmbalance_llm.data.raw_converters:ucf101_main",
    ("make-data", "food101"): "mmbalance_llm.data.raw_converters:food101_main",
    ("make-data", "mosei"): "mmbalance_llm.data.raw_converters:mosei_main",
    ("attribute",): "mmbalance_llm.attribution.cli:attribute_main",
    ("reliance",): "mmbalance_llm.eval.reliance_cli:reliance_main",
}


def _delegate(argv: list):
    for words, target in sorted(DELEGATED.items(), key=lambda kv: -len(kv[0])):
        if tuple(argv[: len(words)]) == words:
            module, func = target.split(":")
            return getattr(importlib.import_module(module), func), argv[len(words):]
    return None, None


def cmd_train(args) -> int:
    from mmbalance_llm.config import TASKS, describe_task, load_recipe, read_yaml

    if args.help:
        task = "classify"
        if args.recipe:
            task = read_yaml(args.recipe).get("task", "classify")
        print(args.parser.format_help())
        for t in ([task] if task in TASKS else TASKS):
            print(describe_task(t) + "\n")
        return 0
    if not args.recipe:
        args.parser.error("the following arguments are required: recipe")
    from mmbalance_llm.train.trainer import Trainer

    recipe = load_recipe(read_yaml(args.recipe), args.overrides)
    final = Trainer(recipe).fit()
    if final is not None and int(os.environ.get("RANK", "0")) == 0:
        test = final.get("test") or final.get("validation") or {}
        keys = ("accuracy", "macro_f1", "unimodal_accuracy", "imbalance") if recipe.task == "classify" else \
            ("accuracy", "loss") + tuple(k for k in test if k.startswith("accuracy_"))
        shown = {k: test.get(k) for k in keys}
        if "test_before_training" in final:
            shown["accuracy_before_training"] = final["test_before_training"].get("accuracy")
        print(json.dumps(shown, indent=2))
        print(f"[mmbalance] wrote {recipe.output_dir}/final_metrics.json")
    return 0


def cmd_compare(args) -> int:
    from mmbalance_llm.compare import run_compare

    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        raise ValueError(f"--seeds must be comma-separated integers, got {args.seeds!r}") from None
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    from mmbalance_llm.balance import method_class

    for m in methods:
        method_class(m)  # fail before any training on a misspelled name
    if args.jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {args.jobs}")
    if args.recipes and args.recipe:
        raise ValueError("give --recipes DIR (one recipe per method) or --recipe FILE (one for all), not both")
    run_compare(args.output_dir, methods=methods, seeds=seeds, recipe_path=args.recipe, data_path=args.data,
                preset=args.preset, alone=not args.no_alone, overrides=args.overrides, recipes_dir=args.recipes,
                jobs=args.jobs)
    return 0


def cmd_eval(args) -> int:
    from mmbalance_llm.eval.saved import evaluate_saved

    metrics = evaluate_saved(args.model, args.data, args.split, batch_size=args.batch_size)
    print(json.dumps(metrics, indent=2))
    if args.out:
        from mmbalance_llm.train.io import write_json_atomic

        write_json_atomic(args.out, metrics)
    return 0


def cmd_make_data(args) -> int:
    if args.kind == "synthetic":
        from mmbalance_llm.data.synthetic import spec_from_args, write_synthetic

        spec = spec_from_args(args.preset, args.modality, num_classes=args.num_classes, train_size=args.train_size,
                              validation_size=args.validation_size, test_size=args.test_size, seed=args.seed)
        write_synthetic(args.out_dir, spec)
        print(f"[mmbalance] wrote {args.out_dir} ({', '.join(m.name for m in spec.modalities)}; "
              f"{spec.train_size}/{spec.validation_size}/{spec.test_size} samples, card.json)")
        return 0
    raise SystemExit(f"unknown data kind {args.kind!r}")


def cmd_methods(args) -> int:
    from mmbalance_llm.balance import available_methods, method_class

    for name in available_methods():
        d = method_class(name).describe()
        many = "M>2" if d["supports_many_modalities"] else "M=2"
        tasks = "+".join(d["tasks"])  # recipe `task`: classify (classifiers) and / or sft (MLLM fine-tuning)
        print(f"{name:18s} {d['stage']:13s} {tasks:13s} {many:5s} {d['paper']}")
        for key, f in d["hyperparameters"].items():
            print(f"{'':20s}{key} = {f['default']!r}: {f['help']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from mmbalance_llm import __version__
    from mmbalance_llm.data.synthetic import PRESETS  # numpy only: --help stays far cheaper than `import torch`

    p = argparse.ArgumentParser(prog="mmbalance", description="Balanced multimodal fine-tuning toolkit.")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    p.add_argument("--verbose", action="store_true",
                   help="show the dependencies' warnings, banners and progress bars (also MMBALANCE_VERBOSE=1)")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train from a YAML recipe (task classify or sft)", add_help=False,
                       description="Train from a YAML recipe. `mmbalance train RECIPE --help` lists every key of "
                                   "that recipe's task with its help and default.")
    t.add_argument("recipe", nargs="?")
    t.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.learning_rate=3e-4")
    t.add_argument("-h", "--help", action="store_true", help="show this help and the recipe keys, then exit")
    t.set_defaults(func=cmd_train, parser=t)

    c = sub.add_parser("compare", help="train several methods on the same data and tabulate")
    c.add_argument("overrides", nargs="*", help="dotted.key=value overrides applied to every run")
    c.add_argument("--recipe", default=None, help="one base recipe for every method, each with its built-in "
                                                  "defaults (default: the built-in synthetic baseline)")
    c.add_argument("--recipes", default=None, help="folder of per-method recipes, DIR/<method>.yaml (e.g. "
                                                   "recipes/synthetic); `none` and the trained-alone runs use "
                                                   "DIR/baseline.yaml")
    c.add_argument("--jobs", type=int, default=1, help="runs side by side in this many worker processes")
    c.add_argument("--methods", default="none,unimodal_aux,ogm_ge")
    c.add_argument("--seeds", default="0")
    c.add_argument("--preset", default="av_imbalance", help="synthetic preset when no data path is given")
    c.add_argument("--data", default=None, help="dataset path (overrides the recipe's data.path)")
    c.add_argument("--output-dir", default="runs/compare")
    c.add_argument("--no-alone", action="store_true", help="skip training each modality alone")
    c.set_defaults(func=cmd_compare)

    e = sub.add_parser("eval", help="evaluate a saved model (e.g. RUN/best) on a dataset split")
    e.add_argument("model")
    e.add_argument("--data", required=True)
    e.add_argument("--split", default="test")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--out", default=None, help="also write the metrics to this JSON file")
    e.set_defaults(func=cmd_eval)

    d = sub.add_parser("make-data", help="generate datasets: synthetic (features), mm-instruct (images/tones + "
                                         "questions for MLLM fine-tuning), tiny-model (random-weight MLLM twins)")
    d.add_argument("kind", choices=["synthetic", "mm-instruct", "tiny-model", "diagnostic", "from-arrays"])
    d.add_argument("out_dir")
    d.add_argument("--preset", default=None, help="synthetic preset: " + " | ".join(PRESETS))
    d.add_argument("--modality", action="append", default=[],
                   help="name:dim=32,snr=2.0,encoding=linear|mixture|tokens,informative=1.0,seq_len=16,signal_tokens=2")
    d.add_argument("--num-classes", type=int, default=None)
    d.add_argument("--train-size", type=int, default=None)
    d.add_argument("--validation-size", type=int, default=None)
    d.add_argument("--test-size", type=int, default=None)
    d.add_argument("--seed", type=int, default=None)
    d.set_defaults(func=cmd_make_data)

    sub.add_parser("attribute", help="token-level modality attribution report (see `mmbalance attribute -h`)")
    sub.add_parser("reliance", help="modality reliance on VLM benchmark files (see `mmbalance reliance -h`)")
    m = sub.add_parser("methods", help="list balancing methods with stage and hyperparameters")
    m.set_defaults(func=cmd_methods)
    return p


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    verbose = os.environ.get("MMBALANCE_VERBOSE", "") not in ("", "0")
    if "--verbose" in argv:  # a global flag, accepted anywhere; stripped so every command sees its own argv
        verbose = True
        argv = [a for a in argv if a != "--verbose"]
    debug = os.environ.get("MMBALANCE_DEBUG", "") not in ("", "0")
    if "--debug" in argv:  # full tracebacks instead of the one-line errors
        debug = True
        argv = [a for a in argv if a != "--debug"]
    from mmbalance_llm.utils.console import quiet_dependencies

    quiet_dependencies(verbose)
    from mmbalance_llm.config import RecipeError
    from mmbalance_llm.data.errors import DataError  # not data.features: that one imports torch

    func, rest = _delegate(argv)
    if func is None:
        args = build_parser().parse_args(argv)
        func, rest = args.func, args
    try:
        code = func(rest)
        _leave_process_group()
        return code
    except (RecipeError, DataError, OSError, RuntimeError, ValueError, KeyError) as exc:
        # a user's bad input (a recipe, a data file, a folder that cannot be written): one line, no traceback
        # (--debug or MMBALANCE_DEBUG=1 shows it)
        if debug:
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        if isinstance(exc, OSError) and exc.filename and str(exc.filename) not in text:
            text += f": {exc.filename}"
        print(f"mmbalance: error: {text}", file=sys.stderr)
        return 2


def _leave_process_group() -> None:
    """A launched command ends by leaving its process group: a live gloo group at interpreter exit can abort
    the process after its work is done ("terminate called without an active exception")."""
    if "torch" not in sys.modules:  # --help, --version, methods: nothing was launched
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    raise SystemExit(main())
