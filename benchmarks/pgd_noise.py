"""What PGD's perturbations do at the end of training, where the learning rate is small.

At learning rates 1e-3 and 1e-5 (epochs 161-200 of the reference schedule)
the gradient hardly pulls the weights back, so PGD perturbations that are
harmless at lr 0.1 add up to a random walk: k perturbations of radius r, about
``r·sqrt(k)`` (PGD every step, r 0.5, the last 20 epochs: 0.5·sqrt(1940) = 22).
Two measurements on a trained checkpoint:

``--jumps R ...`` (cheap): the test accuracy after one isotropic jump of norm R
(``--draws`` directions each), with the stored BatchNorm statistics and with
statistics re-estimated from ``--bn-batches`` training batches (training
would re-estimate them; stale statistics overstate the damage). No gradient
pulls back: an upper bound on the damage of that much accumulated noise.

``--variant NAME:KEY=VALUE,...`` (costly; a GPU job for 40 epochs): continue
the run from the checkpoint (weights, BatchNorm statistics, momentum) for
``--epochs`` epochs at the schedule of epoch ``--at`` (default 170: lr 1e-3,
DRW on) with those PGD settings, after a plain SGD continuation; prints the test
accuracy after each epoch.

    python benchmarks/pgd_noise.py --data-root DIR .gpu/table/ce-drw/last.pt --jumps 10 22 31
    python benchmarks/pgd_noise.py --data-root DIR .gpu/table/ce-drw/last.pt \\
        --variant every-step:pgd_interval=1 --variant per-epoch:pgd_interval=97 --epochs 40
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from arguments import positive  # noqa: E402
from bn_running_stats import reestimate_statistics, run_data  # noqa: E402

from spectra.train import parse_override  # noqa: E402
from spectra.train.checkpoint import load_training_checkpoint, model_from_checkpoint  # noqa: E402
from spectra.train.config import TrainConfig  # noqa: E402
from spectra.train.evaluation import evaluate  # noqa: E402
from spectra.train.noise import split_like  # noqa: E402
from spectra.train.trainer import Trainer  # noqa: E402


def jumped(model: torch.nn.Module, norm: float, seed: int) -> torch.nn.Module:
    """A copy of ``model`` whose trainable parameters moved by ``norm · z/‖z‖``, ``z ~ N(0, I)``
    (the direction of a PGD perturbation; BatchNorm statistics unchanged)."""
    model = copy.deepcopy(model)
    params = [p for p in model.parameters() if p.requires_grad]
    z = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        torch._foreach_add_(params, split_like(z * (norm / z.norm()), params))
    return model


def jump_accuracies(ck: dict, data_root: str, norms: list[float], draws: int, bn_batches: int,
                    max_test: int | None) -> list[dict]:
    """Test accuracy after isotropic jumps of each norm, stale and re-estimated BatchNorm statistics."""
    train, test, source = run_data(ck, data_root, max_test)
    base = model_from_checkpoint(ck)
    images, _ = source.epoch(10_000)  # an epoch the run never saw

    def score(model: torch.nn.Module) -> dict:
        r = evaluate(model, test.images, test.labels, train.class_counts)
        return {"acc": r["acc"], "tail_acc": r["tail_acc"]}

    rows = [{"norm": 0.0, "draw": None, "stale": score(base), "restat": score(reestimate_statistics(base, images[:bn_batches]))}]
    print(json.dumps(rows[-1]), flush=True)
    for norm in norms:
        for draw in range(draws):
            model = jumped(base, norm, seed=draw)
            rows.append({"norm": norm, "draw": draw, "stale": score(model),
                         "restat": score(reestimate_statistics(model, images[:bn_batches]))})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def continued_accuracies(ck: dict, data_root: str, overrides: dict, at: int, epochs: int,
                         max_test: int | None, device: str) -> list[dict]:
    """Test metrics after each of ``epochs`` epochs continued from checkpoint ``ck`` at epoch ``at``."""
    cfg = dict(ck["config"], data_root=data_root, device=device, compile="off" if device == "cpu" else "auto",
               progress=False, max_test_samples=max_test, time_limit_s=None, **overrides)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(TrainConfig.from_dict(cfg), out)
        trainer.model.load_state_dict(ck["state_dict"])
        trainer.optimizer.load_state_dict(ck["optimizer"])
        trainer.prepare()
        rows = []
        for e in range(at, at + epochs):
            t0 = time.perf_counter()
            stats = trainer.train_epoch(e)
            m = trainer.evaluate()
            weight_norm = torch.sqrt(sum((p.detach().double() ** 2).sum() for p in trainer.params)).item()
            rows.append({"epoch": e, "lr": stats["lr"], "train_loss": stats["train_loss"], "acc": m["acc"],
                         "tail_acc": m["tail_acc"], "weight_norm": weight_norm,
                         "perturbations": int(trainer.state.pgd_count.item()), "seconds": time.perf_counter() - t0})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a spectra train checkpoint (with optimizer state for --variant: last.pt)")
    p.add_argument("--data-root", required=True)
    p.add_argument("--jumps", type=positive(float), nargs="*", default=[], metavar="R", help="norms of single isotropic jumps")
    p.add_argument("--draws", type=positive(int), default=3, help="directions per jump norm")
    p.add_argument("--bn-batches", type=positive(int), default=30, help="training batches that re-estimate BatchNorm statistics")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                   help="a PGD setting to continue training with (repeatable); plain SGD runs first")
    p.add_argument("--no-baseline", action="store_true", help="skip the plain SGD continuation")
    p.add_argument("--at", type=positive(int), default=170, help="1-indexed epoch whose learning rate / class weights are used")
    p.add_argument("--epochs", type=positive(int), default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--max-test-samples", type=positive(int), default=None, help="a class-stratified part of the test set")
    p.add_argument("--out", help="JSON file for the results")
    args = p.parse_args()
    if not args.jumps and not args.variant:
        p.error("give --jumps and/or --variant")
    ck = load_training_checkpoint(args.checkpoint, map_location="cpu")
    result: dict = {"checkpoint": args.checkpoint, "epoch": ck.get("epoch"), "method": ck.get("method")}
    if args.jumps:
        result["jumps"] = jump_accuracies(ck, args.data_root, args.jumps, args.draws, args.bn_batches, args.max_test_samples)
    if args.variant:
        variants = {} if args.no_baseline else {"sgd": {"optimizer": "sgd"}}
        for v in args.variant:
            name, _, items = v.partition(":")
            variants[name] = {"optimizer": "pgd", **dict(parse_override(i) for i in items.split(",") if i)}
        result["at"], result["continued"] = args.at, {}
        for name, overrides in variants.items():
            print(f"== {name}: {overrides}", flush=True)
            try:
                epochs = continued_accuracies(ck, args.data_root, overrides, args.at, args.epochs, args.max_test_samples,
                                              args.device)
            except ValueError as exc:  # a setting the trainer refuses (e.g. a check newer than the checkpoint)
                raise SystemExit(f"variant {name}: {str(exc).splitlines()[0]}") from None
            result["continued"][name] = {"overrides": overrides, "epochs": epochs}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
