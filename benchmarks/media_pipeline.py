"""Throughput of the raw-media pipeline (data/media_columns.py) on a CREMA-D replica.

    python benchmarks/media_pipeline.py [--per-class 40] [--epochs 3] [--size 112] [--out benchmarks/results]

Four ways to feed the same clips (wav audio -> log-STFT spectrogram [1, 257, 188], flv video -> 2 frames
resized to size x size, ImageNet-normalised) through a DataLoader (batch 16, 0 workers):

- plain: a map-style Dataset that decodes and transforms every item on every epoch (soundfile + PyAV + PIL,
  the BalanceBenchmark-style loop; torchvision is not importable on this CPU build, so its Resize /
  Normalize are the PIL / numpy equivalents in data/media_columns.py);
- cached, first epoch: `load_feature_data` (decode + preprocess once through datasets.map, written to the
  Arrow cache) plus one pass over the loader;
- cached, later epochs: passes over the loader of the same process (the cache is memory-mapped);
- cached, new run: `load_feature_data` again in a fresh process state (reads the fingerprinted cache);
- pre-extracted arrays: the same tensors held in memory by the float-array `FeatureDataset`.

Samples/s are medians over `--epochs` passes (cached and pre-extracted passes interleaved); the ratios are
what docs/raw_media.md quotes. Augmentation is off
for the timing (it is per item and identical in every path that has it).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from mmbalance_llm.config import DataConfig
from mmbalance_llm.data import media_columns as media
from mmbalance_llm.data.features import FeatureDataset, collate, load_feature_data
from mmbalance_llm.data.raw_replica import write_replica

BATCH = 16


class PlainDataset(torch.utils.data.Dataset):
    """Decode and transform on every access: what a loader without a cache does each epoch."""

    def __init__(self, rows, specs):
        self.rows, self.specs = rows, specs

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        item = {m: torch.from_numpy(media.process_value(row[m], s, media.load_processor(s), ""))
                for m, s in self.specs.items()}
        item["labels"] = torch.tensor(row["label"])
        return item


def one_pass(ds) -> float:
    """Samples/s of one full pass over ds."""
    tick = time.perf_counter()
    n = 0
    for batch in DataLoader(ds, batch_size=BATCH, shuffle=False, collate_fn=collate):
        n += len(batch["labels"])
    return n / (time.perf_counter() - tick)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--per-class", type=int, default=40, help="clips per emotion (6 emotions)")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--size", type=int, default=112)
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args()
    torch.set_num_threads(1)
    work = tempfile.mkdtemp(prefix="media_bench_")
    try:
        raw, data = os.path.join(work, "raw"), os.path.join(work, "data")
        write_replica("cremad", raw, per_class=args.per_class)
        from mmbalance_llm.cli import main as cli

        cli(["make-data", "cremad", raw, data, "--validation-fraction", "0.1"])
        over = {"audio": {"processor": "spectrogram"},
                "visual": {"processor": "imagenet", "size": args.size, "augment": False}}
        cfg = DataConfig(path=data, media=over)
        specs = media.media_specs(cfg, ["audio", "visual"])
        with open(os.path.join(data, "train.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        n = len(rows)

        plain = [one_pass(PlainDataset(rows, specs)) for _ in range(args.epochs)]

        tick = time.perf_counter()
        loaded = load_feature_data(cfg)
        load_first = time.perf_counter() - tick
        first_pass = one_pass(loaded.train)
        first_epoch = n / (load_first + n / first_pass)
        # Interleaved with the pre-extracted passes, so that load from other processes hits both alike.
        tensors = {m: torch.stack([loaded.train[i][m] for i in range(n)]) for m in loaded.modalities}
        arrays = FeatureDataset(tensors, loaded.train.labels)
        later, pre = [], []
        for _ in range(args.epochs):
            later.append(one_pass(loaded.train))
            pre.append(one_pass(arrays))

        tick = time.perf_counter()
        again = load_feature_data(cfg)
        load_again = time.perf_counter() - tick
        new_run = n / (load_again + n / one_pass(again.train))

        n_all = sum(len(d) for d in (loaded.train, loaded.validation, loaded.test))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    med = statistics.median
    result = {
        "clips": n, "frame_size": args.size, "epochs": args.epochs, "batch_size": BATCH, "threads": 1,
        "samples_per_s": {"plain_loop": med(plain), "cached_first_epoch": first_epoch,
                          "cached_later_epochs": med(later), "cached_new_run": new_run,
                          "pre_extracted_arrays": med(pre)},
        "seconds": {"preprocess_and_cache_all_splits": load_first, "load_from_cache": load_again},
        "ms_per_clip": {"plain_loop": 1000 / med(plain), "preprocess_and_cache": 1000 * load_first / n_all},
        "clips_all_splits": n_all,
    }
    s = result["samples_per_s"]
    result["ratios"] = {"later_vs_first_epoch": s["cached_later_epochs"] / s["cached_first_epoch"],
                        "later_vs_plain_loop": s["cached_later_epochs"] / s["plain_loop"],
                        "pre_extracted_vs_cached": s["pre_extracted_arrays"] / s["cached_later_epochs"]}
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "media_pipeline.json"), "w") as fh:
        json.dump(result, fh, indent=2)
    lines = ["| path | samples/s |", "|---|---:|"] + [f"| {k.replace('_', ' ')} | {v:.1f} |" for k, v in s.items()]
    lines += ["", "| ratio | value |", "|---|---:|"] + [f"| {k.replace('_', ' ')} | {v:.2f}x |"
                                                       for k, v in result["ratios"].items()]
    table = "\n".join(lines)
    with open(os.path.join(args.out, "media_pipeline.md"), "w") as fh:
        fh.write(f"CREMA-D replica: {n} training clips ({n_all} in all splits), frames {args.size}x{args.size}, "
                 f"batch {BATCH}, 1 thread. The cached first epoch includes reading the jsonl splits and "
                 f"preprocessing all {n_all} clips ({result['ms_per_clip']['preprocess_and_cache']:.1f} ms per clip; "
                 f"the plain loop spends {result['ms_per_clip']['plain_loop']:.1f} ms per clip every epoch).\n\n"
                 + table + "\n")
    print(table)


if __name__ == "__main__":
    main()
