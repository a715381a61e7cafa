"""How much of a checkpoint's test accuracy is BatchNorm's running statistics?

Re-estimates the running statistics of each checkpoint from ``--batches``
fresh augmented training batches (train-mode forward passes, no gradients,
BatchNorm's own momentum, so the stored statistics are forgotten), ``--draws``
times with different batches, and evaluates every copy on the test set. The
spread across draws is the noise of the statistics alone; a gap to the stored
checkpoint's accuracy points at its statistics, not its weights (SAM's
perturbed second pass, for one, also updates them).

    python benchmarks/bn_running_stats.py --data-root DIR runs/ce-sam/last.pt runs/ce/last.pt
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from spectra.datasets import DatasetSpec, LoadedDataset, load_dataset, normalize  # noqa: E402
from spectra.train.augment import EpochBatches  # noqa: E402
from spectra.train.checkpoint import load_training_checkpoint, model_from_checkpoint  # noqa: E402
from spectra.train.evaluation import evaluate  # noqa: E402


def run_data(ck: dict, data_root: str, max_test: int | None = None) -> tuple[LoadedDataset, LoadedDataset, EpochBatches]:
    """The training and test sets of a training checkpoint's run (the test set class-stratified
    to about ``max_test`` images), and its augmented training batches (``.epoch(e)``; epochs
    from 10,000 on are ones the run never saw)."""
    cfg = ck["config"]
    spec = DatasetSpec(cfg["dataset"], root=data_root, imbalance_ratio=cfg["imbalance_ratio"], profile=cfg["imbalance_profile"],
                       seed=cfg["data_seed"])
    train, test = load_dataset(spec), load_dataset(dataclasses.replace(spec.with_split("test"), max_samples=max_test))
    return train, test, EpochBatches(train.images, train.labels, cfg["batch_size"], cfg["seed"], torch.device("cpu"))


def restat_accuracies(path: str, data_root: str, batches: int, draws: int) -> tuple[dict, list[float]]:
    """``(stored metrics, test accuracy after each re-estimate)`` for one training checkpoint."""
    ck = load_training_checkpoint(path, map_location="cpu")
    train, test, source = run_data(ck, data_root)
    base = model_from_checkpoint(ck)
    accs = []
    for draw in range(draws):
        images, _ = source.epoch(10_000 + draw)  # epochs the run never saw
        model = reestimate_statistics(base, images[:batches])
        accs.append(evaluate(model, test.images, test.labels, train.class_counts)["acc"])
    return ck.get("metrics") or {}, accs


def reestimate_statistics(model: torch.nn.Module, batches: torch.Tensor) -> torch.nn.Module:
    """A copy of ``model`` after train-mode forward passes (no gradients) over
    ``batches`` (uint8 (S, B, C, 32, 32)): only BatchNorm's running statistics change."""
    model = copy.deepcopy(model).train()
    with torch.no_grad():
        for batch in batches:
            model(normalize(batch.permute(0, 2, 3, 1)))  # NCHW batches → the NHWC normaliser
    return model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoints", nargs="+", help="spectra train checkpoints (last.pt, ckpt_epoch*.pt)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--batches", type=int, default=30)
    p.add_argument("--draws", type=int, default=4)
    args = p.parse_args()
    for path in args.checkpoints:
        stored, accs = restat_accuracies(path, args.data_root, args.batches, args.draws)
        print(f"{path}: stored {stored.get('acc', float('nan')):.2f} %, re-estimated statistics "
              + ", ".join(f"{a:.2f}" for a in accs) + " %", flush=True)


if __name__ == "__main__":
    main()
