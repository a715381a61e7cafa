r"""How much accuracy does the project's JPEG copy of CIFAR-10 cost?

The only full CIFAR-10 here passed through JPEG (quality ≈ 75, 4:2:0), so the
table of REPRODUCTION.md is trained and tested on degraded images. The shared
folder also holds the exact original pixels of training images 0–3999 and
test images 0–999 (``lossless_subset.npz``). This script trains the same
model on those 4,000 training images twice — once from the originals, once
from their JPEG versions in the project's copy (the same images, same order,
same seed) — and evaluates both models on the 1,000 original test images and
on the same 1,000 re-encoded by Pillow at quality 75, 4:2:0 (the shipped
files are matched to 0.7/255 mean absolute error by that setting; the
project's own JPEG test images cannot be paired with the originals, whose
order is lost).

    python benchmarks/jpeg_effect.py --data-root DIR --lossless ../shared/data/cifar10/lossless_subset.npz \
        --out benchmarks/results/jpeg_effect.json --epochs 30 --seeds 0 1

``DIR`` holds ``cifar-10-batches-py`` made by ``to_batches.py`` (official
training order). The two kinds of training data train in parallel processes
(one thread each). Any ``spectra train`` method preset (``--method``) and
balanced or long-tailed selection (``--imbalance-ratio``) of the 4,000.

With ``--checkpoints`` it trains nothing: it evaluates those ``spectra train``
checkpoints (e.g. the table's, trained on the JPEG copy) on the 1,000 original
test images and on their re-encoded versions — the test-time part of the cost:

    python benchmarks/jpeg_effect.py --lossless ../shared/data/cifar10/lossless_subset.npz \
        --out jpeg_test_time.json --checkpoints runs/table/*/last.pt
"""
from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spectra from this checkout
KINDS = ("original", "jpeg")


def jpeg_roundtrip(images: np.ndarray, quality: int = 75) -> np.ndarray:
    """uint8 NHWC through Pillow's JPEG encoder (4:2:0 chroma) and back."""
    from PIL import Image

    out = np.empty_like(images)
    for i, img in enumerate(images):
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, "JPEG", quality=quality, subsampling=2)
        out[i] = np.asarray(Image.open(buf))
    return out


def write_batches(folder: Path, train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray) -> None:
    """The standard ``cifar-10-batches-py`` pickles: all training images in
    ``data_batch_1`` (batches 2–5 empty), NHWC uint8 → rows of 3,072 (CHW)."""
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, x: np.ndarray, y: np.ndarray) -> None:
        rows = x.transpose(0, 3, 1, 2).reshape(len(x), 3 * 32 * 32)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [int(v) for v in y]}, f)

    dump("data_batch_1", train_x, train_y)
    for i in range(2, 6):
        dump(f"data_batch_{i}", train_x[:0], train_y[:0])
    dump("test_batch", test_x, test_y)


def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Both data folders; returns facts about the pixels (mean abs errors)."""
    from spectra.datasets import read_cifar

    z = np.load(args.lossless)
    x_orig, y_orig = z["x_train_0_3999"], z["y_train_0_3999"].astype(np.int64)
    t_orig, ty = z["x_test_0_999"], z["y_test_0_999"].astype(np.int64)
    x_jpeg_all, y_jpeg_all, _ = read_cifar(args.data_root, "cifar10", "train")
    x_jpeg, y_jpeg = x_jpeg_all[: len(x_orig)], y_jpeg_all[: len(x_orig)]
    if not np.array_equal(y_jpeg, y_orig):
        raise SystemExit("the JPEG copy's first training labels differ from the lossless subset's: not the official order")
    t_jpeg = jpeg_roundtrip(t_orig)
    write_batches(work / "original" / "cifar-10-batches-py", x_orig, y_orig, t_orig, ty)
    write_batches(work / "jpeg" / "cifar-10-batches-py", x_jpeg, y_jpeg, t_jpeg, ty)
    mae = lambda a, b: float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())  # noqa: E731
    return {
        "train_mean_abs_error_shipped_jpeg": mae(x_jpeg, x_orig),
        "train_mean_abs_error_pillow_q75_vs_shipped": mae(jpeg_roundtrip(x_orig[:500]), x_jpeg[:500]),
        "test_mean_abs_error_pillow_q75": mae(t_jpeg, t_orig),
    }


def train_kind(args: argparse.Namespace, work: Path, kind: str) -> list[dict]:
    """Child process: train ``kind`` for every seed, evaluate on both test sets."""
    import torch

    from spectra.datasets import DatasetSpec, load_dataset
    from spectra.train import fit, resolve_config
    from spectra.train.evaluation import evaluate

    torch.set_num_threads(1)
    dataset = "cifar10-lt" if args.imbalance_ratio > 1 else "cifar10"
    tests = {k: load_dataset(DatasetSpec("cifar10", root=str(work / k), split="test")) for k in KINDS}
    rows = []
    for seed in args.seeds:
        config = resolve_config(args.method, dataset=dataset, data_root=str(work / kind), epochs=args.epochs, seed=seed,
                                device="cpu", arch=args.arch, eval_every=args.epochs, save_every=args.epochs,
                                imbalance_ratio=max(1.0, args.imbalance_ratio), progress=False)
        t0 = time.time()
        result = fit(config, work / "runs" / f"{kind}-seed{seed}", log=lambda msg: None)
        counts = result.summary["class_counts"]
        row = {"train_data": kind, "seed": seed, "train_images": result.summary["train_images"], "train_s": time.time() - t0,
               "final_train_acc": result.summary["final"]["train_acc"]}
        for k, test in tests.items():
            r = evaluate(result.model, test.images, test.labels, counts)
            row[f"acc_on_{k}_test"] = r["acc"]
            if args.imbalance_ratio > 1:  # "tail" (the rarest 30 % of classes) means nothing on balanced data
                row[f"tail_acc_on_{k}_test"] = r["tail_acc"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def evaluate_checkpoints(args: argparse.Namespace) -> dict:
    """Accuracy of each checkpoint on test images 0–999, original vs JPEG (Pillow q75 4:2:0)."""
    import torch

    from spectra.train.checkpoint import load_training_checkpoint, model_from_checkpoint
    from spectra.train.evaluation import evaluate

    z = np.load(args.lossless)
    original, labels = z["x_test_0_999"], torch.from_numpy(z["y_test_0_999"].astype(np.int64))
    tests = {"original": torch.from_numpy(original), "jpeg": torch.from_numpy(jpeg_roundtrip(original))}
    rows = []
    for path in args.checkpoints:
        ck = load_training_checkpoint(path, map_location="cpu")
        model, counts = model_from_checkpoint(ck), ck["class_counts"]
        row = {"checkpoint": str(path), "method": ck.get("method"), "epoch": ck.get("epoch")}
        for kind, images in tests.items():
            r = evaluate(model, images, labels, counts)
            row[f"acc_on_{kind}_test"], row[f"tail_acc_on_{kind}_test"] = r["acc"], r["tail_acc"]
        print(f"{row['method'] or path}: original {row['acc_on_original_test']:.1f} (tail {row['tail_acc_on_original_test']:.1f}), "
              f"JPEG {row['acc_on_jpeg_test']:.1f} (tail {row['tail_acc_on_jpeg_test']:.1f})", flush=True)
        rows.append(row)
    gap = [r["acc_on_original_test"] - r["acc_on_jpeg_test"] for r in rows]
    return {"what": "checkpoints evaluated on CIFAR-10 test images 0-999, original vs Pillow-JPEG q75 4:2:0",
            "test_counts": np.bincount(labels.numpy(), minlength=10).tolist(), "runs": rows,
            "mean_original_minus_jpeg": float(np.mean(gap))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", help="folder with the JPEG copy's cifar-10-batches-py (for training)")
    p.add_argument("--lossless", required=True, help="lossless_subset.npz")
    p.add_argument("--out", required=True, help="results JSON")
    p.add_argument("--work", default="/tmp/jpeg_effect", help="data folders and runs")
    p.add_argument("--method", default="ce")
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--imbalance-ratio", type=float, default=1.0, help="> 1: long-tailed selection of the 4,000")
    p.add_argument("--checkpoints", nargs="+", help="evaluate these checkpoints on original vs JPEG test images; train nothing")
    p.add_argument("--child", choices=KINDS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.checkpoints:
        result = evaluate_checkpoints(args)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"mean original − JPEG: {result['mean_original_minus_jpeg']:+.2f} points")
        return
    if not args.data_root:
        p.error("--data-root is needed to train (or give --checkpoints)")
    work = Path(args.work)
    if args.child:
        train_kind(args, work, args.child)
        return
    t0 = time.time()
    facts = prepare(args, work)
    print(json.dumps(facts), flush=True)
    base = [sys.executable, __file__, *sys.argv[1:]]
    procs = {k: subprocess.Popen(base + ["--child", k], stdout=subprocess.PIPE, text=True) for k in KINDS}
    rows = []
    for k, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise SystemExit(f"training on the {k} images failed (exit {proc.returncode})")
        rows += [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    summary = {}
    for k in KINDS:
        mine = [r for r in rows if r["train_data"] == k]
        summary[k] = {f"mean_{m}_on_{t}_test": float(np.mean([r[f"{m}_on_{t}_test"] for r in mine]))
                      for t in KINDS for m in ("acc", "tail_acc") if f"{m}_on_{t}_test" in mine[0]}
    result = {
        "what": "ResNet trained on CIFAR-10 training images 0-3999, original pixels vs the project's JPEG copy; "
                "evaluated on test images 0-999, original and Pillow-JPEG q75 4:2:0",
        "settings": {k: getattr(args, k) for k in ("method", "arch", "epochs", "seeds", "imbalance_ratio")},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, CPU, one thread per run",
        "pixels": facts, "runs": rows, "summary": summary, "wall_s": time.time() - t0,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    for k in KINDS:
        s = summary[k]
        tail = "".join(f", tail {s[f'mean_tail_acc_on_{t}_test']:.2f} ({t})" for t in KINDS if f"mean_tail_acc_on_{t}_test" in s)
        print(f"trained on {k:8s}: acc on original test {s['mean_acc_on_original_test']:.2f}, on JPEG test {s['mean_acc_on_jpeg_test']:.2f}{tail}")


if __name__ == "__main__":
    main()
