"""Feature-dataset loading and batch fetching, as ratios to a vectorised read, in one interleaved run.

Loading: `load_feature_data` on a saved 30k-row synthetic DatasetDict (train 30k, validation and test 3k)
against the floor, `datasets.load_from_disk` + `with_format("numpy")[:]` + `torch.from_numpy` per split,
and against the old row-by-row column read (the fast path switched off). Fetching: one shuffled epoch of
batches from `FeatureDataset` with the batched `__getitems__` against the old per-sample `__getitem__` +
`default_collate`, alone and inside an MLP training epoch (two 2-layer MLP encoders, concat head,
Adam). Each round runs every variant once, in rotating order, so a load change hits all alike; the
table reports medians over rounds and the median of the per-round ratios. Single-threaded.

    python benchmarks/data_loading.py --rounds 5
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(key, "1")


def interleaved(variants: dict, rounds: int) -> dict:
    """{name: [seconds per round]}; round r starts at variant r mod len(variants)."""
    names = list(variants)
    out = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[: r % len(names)]:
            tick = time.perf_counter()
            variants[n]()
            out[n].append(time.perf_counter() - tick)
    return out


def ratio_rows(times: dict, base: str) -> list:
    rows = []
    for name, secs in times.items():
        ratios = [s / b for s, b in zip(secs, times[base])]
        rows.append({"variant": name, "median_s": statistics.median(secs), "ratio": statistics.median(ratios),
                     "ratio_min": min(ratios), "ratio_max": max(ratios)})
    return rows


def table(title: str, rows: list, base: str) -> str:
    lines = [f"**{title}**", "", f"| variant | median time | × {base} (median, min-max over rounds) |",
             "|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['median_s'] * 1000:.1f} ms | {r['ratio']:.2f} "
                     f"({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) |")
    return "\n".join(lines)


def main(argv=None) -> int:
    import datasets
    import torch

    from mmbalance_llm.config import DataConfig
    from mmbalance_llm.data import features
    from mmbalance_llm.data.synthetic import ensure_preset

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--rows", type=int, default=30000)
    p.add_argument("--preset", default="av_imbalance")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--work-dir", default=os.path.join(ROOT, "runs", "bench_data"))
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "data_loading"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    datasets.disable_progress_bars()
    path = ensure_preset(os.path.join(args.work_dir, f"{args.preset}_{args.rows}"), preset=args.preset,
                         train_size=args.rows, validation_size=args.rows // 10, test_size=args.rows // 10)
    cfg = DataConfig(path=path)

    def floor():
        dd = datasets.load_from_disk(path)
        return {s: {c: torch.from_numpy(v) for c, v in dd[s].with_format("numpy")[:].items()} for s in dd}

    def row_by_row():
        fast, features._fast_column_array = features._fast_column_array, lambda ds, column: None
        try:
            return features.load_feature_data(cfg)
        finally:
            features._fast_column_array = fast

    loading = interleaved({"vectorised numpy read (floor)": floor,
                           "load_feature_data": lambda: features.load_feature_data(cfg),
                           "load_feature_data, row-by-row read (before)": row_by_row}, args.rounds)
    base_load = "vectorised numpy read (floor)"

    data = features.load_feature_data(cfg)
    train = data.train

    class PerItem(torch.utils.data.Dataset):  # the fetch before: no __getitems__
        def __len__(self):
            return len(train)

        def __getitem__(self, i):
            return train[i]

    def loader(ds, collate_fn):
        return torch.utils.data.DataLoader(ds, batch_size=args.batch_size, shuffle=True, collate_fn=collate_fn,
                                           generator=torch.Generator().manual_seed(0))

    batched = loader(train, features.collate)
    per_item = loader(PerItem(), torch.utils.data.default_collate)
    torch.manual_seed(0)
    dims = {m: t.shape[-1] for m, t in train.tensors.items()}
    encoders = torch.nn.ModuleDict({m: torch.nn.Sequential(torch.nn.Linear(d, 128), torch.nn.ReLU(),
                                                           torch.nn.Linear(128, 64)) for m, d in dims.items()})
    head = torch.nn.Linear(64 * len(dims), data.num_classes)
    opt = torch.optim.Adam(list(encoders.parameters()) + list(head.parameters()), lr=1e-3)

    def fetch_epoch(dl):
        for _ in dl:
            pass

    def train_epoch(dl):
        for batch in dl:
            h = torch.cat([encoders[m](batch[m]) for m in dims], dim=-1)
            loss = torch.nn.functional.cross_entropy(head(h), batch["labels"])
            opt.zero_grad()
            loss.backward()
            opt.step()

    fetching = interleaved({"per-sample __getitem__ + default_collate (before)": lambda: fetch_epoch(per_item),
                            "batched __getitems__": lambda: fetch_epoch(batched)}, args.rounds)
    training = interleaved({"MLP epoch, per-sample fetch (before)": lambda: train_epoch(per_item),
                            "MLP epoch, batched fetch": lambda: train_epoch(batched)}, args.rounds)

    n_val = len(data.validation)
    md = "\n\n".join([
        table(f"Loading {args.rows} + {n_val} + {n_val} rows ({args.preset}, {args.rounds} rounds)",
              ratio_rows(loading, base_load), "floor"),
        table(f"One shuffled epoch of batches ({len(train)} rows, batch {args.batch_size})",
              ratio_rows(fetching, "per-sample __getitem__ + default_collate (before)"), "before"),
        table("One MLP training epoch", ratio_rows(training, "MLP epoch, per-sample fetch (before)"), "before"),
    ])
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out + ".md", "w") as fh:
        fh.write(md + "\n")
    with open(args.out + ".json", "w") as fh:
        json.dump({"loading": loading, "fetching": fetching, "training": training}, fh, indent=1)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
