"""λmax / λmin / density speed: spectra vs PyHessian vs curvlinops, same model and data.

CPU (here):  python benchmarks/eigs_speed.py --device cpu --out bench_cpu.json
GPU:         python benchmarks/eigs_speed.py --device cuda --arch resnet32 \
                 --dataset cifar10-lt --data-root DIR --compare-class 3 --all-classes \
                 --out bench_gpu.json

Everything is measured in this one run and reported as ratios between the
tools, with the machine recorded beside the numbers:
- one gradient pass and one HVP (single vector, and a block of 4) over the class;
- a float64 reference λmax/λmin (spectra at tol 1e-9, or 1e-8 on a GPU);
- spectra λmax+λmin to 1e-4 relative residual (fp32, TF32 off), block sizes 1/2/4;
- PyHessian ``eigenvalues()`` (tol 1e-3, one eigenvalue) and which end it found;
- curvlinops ``HessianLinearOperator`` + scipy ``eigsh`` (which="LA", then "SA", tol 1e-4);
- spectra SLQ density (4 probes × 80 steps); PyHessian's density (broken: recorded);
- optionally λmax/λmin and a density for every class (``--all-classes``).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import spectra  # noqa: E402
from spectra.datasets import DatasetSpec, load_dataset, normalize  # noqa: E402
from spectra.models import build_model  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10" / "lossless_subset.npz"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def machine(device: torch.device) -> dict[str, Any]:
    info = {"python": platform.python_version(), "torch": torch.__version__, "cpu_count": os.cpu_count(),
            "platform": platform.platform(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def load_classes(args: argparse.Namespace) -> tuple[dict[int, tuple[torch.Tensor, torch.Tensor]], str]:
    """Normalised images per class, from a CIFAR root, the shared lossless sample, or noise."""
    if args.data_root:
        data = load_dataset(DatasetSpec(args.dataset, root=args.data_root, split="train",
                                        max_samples=args.max_samples))
        x, y, source = normalize(data.images), data.labels, f"{args.dataset} from {args.data_root}"
    elif SHARED.exists():
        raw = np.load(SHARED)
        n = args.samples * 10
        x = normalize(torch.from_numpy(raw["x_train_0_3999"][:n]))
        y = torch.from_numpy(raw["y_train_0_3999"][:n].astype(np.int64))
        source = f"CIFAR-10 training images 0..{n - 1} (exact pixels, {SHARED.name})"
    else:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(args.samples * 10, 3, 32, 32, generator=gen)
        y = torch.arange(args.samples * 10) % 10
        source = "Gaussian noise images (no CIFAR found)"
    return {c: (x[y == c], y[y == c]) for c in range(10)}, source


def build(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)
    model = build_model(args.arch, num_classes=10)
    if args.checkpoint:
        from spectra.checkpoints import load_checkpoint  # noqa: PLC0415
        model = load_checkpoint(args.checkpoint).model
    return model.eval()


def operator(model, data, args, device, dtype=torch.float32, **kw) -> spectra.HessianOperator:
    compiled = args.compile and dtype == torch.float32  # the float64 reference stays eager
    return spectra.HessianOperator(model, nn.CrossEntropyLoss(), data, dtype=dtype, device=device,
                                   batch_size=args.batch_size, compile=compiled, **kw)


def bench_products(H: spectra.HessianOperator, device: torch.device) -> dict[str, float]:
    v = torch.randn(H.dim, 4, dtype=torch.float64, device=device)
    _, first_s = timed(lambda: H @ v[:, 0], device)  # warm-up (compilation when compiling)
    H @ v  # warm-up of the block shape
    _, grad_s = timed(H.gradient, device)
    _, hvp_s = timed(lambda: H @ v[:, 0], device)
    _, block_s = timed(lambda: H @ v, device)
    return {"first_hvp_s": first_s, "gradient_pass_s": grad_s, "hvp_s": hvp_s, "hvp_block4_s": block_s,
            "hvp_over_gradient": hvp_s / grad_s, "block4_per_probe_over_gradient": block_s / 4 / grad_s}


def bench_spectra(H, ref, device, tol, block_sizes) -> dict[str, Any]:
    out = {}
    for b in block_sizes:
        res, secs = timed(lambda: spectra.eigenvalues(H, which="both", tol=tol, block_size=b, max_iter=400), device)
        out[f"block{b}"] = {"seconds": secs, "hvps": res.num_matvecs, "iterations": res.num_iterations,
                            "lambda_max": res.lambda_max, "lambda_min": res.lambda_min,
                            "rel_residual_max": float(res.top_residuals[0] / res.scale),
                            "rel_residual_min": float(res.bottom_residuals[0] / res.scale),
                            "converged": res.converged, **rel_errors(res.lambda_max, res.lambda_min, ref)}
    return out


def rel_errors(lmax: float, lmin: float, ref: dict[str, float]) -> dict[str, float]:
    scale = max(abs(ref["lambda_max"]), abs(ref["lambda_min"]))
    return {"err_max_rel": abs(lmax - ref["lambda_max"]) / scale, "err_min_rel": abs(lmin - ref["lambda_min"]) / scale}


def bench_pyhessian(model, x, y, device, ref) -> dict[str, Any]:
    try:
        from pyhessian import hessian  # noqa: PLC0415
    except ImportError as exc:
        return {"skipped": f"pyhessian not installed ({exc})"}
    torch.manual_seed(0)
    model = model.float().to(device)
    data = (x.to(device), y.to(device))
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        h = hessian(model, nn.CrossEntropyLoss(), data=data, cuda=device.type == "cuda")
        (values, _), secs = timed(lambda: h.eigenvalues(maxIter=100, tol=1e-3, top_n=1), device)
        value = float(values[0])
        end = "lambda_max" if abs(value - ref["lambda_max"]) < abs(value - ref["lambda_min"]) else "lambda_min"
        out = {"seconds": secs, "value": value, "matches": end,
               "rel_error_vs_that_end": abs(value - ref[end]) / abs(ref[end])}
        try:
            h.density(iter=5, n_v=1)
            out["density"] = "ran"
        except Exception as exc:  # noqa: BLE001 - recording the defect
            out["density"] = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        return out
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def bench_curvlinops(model, batches, device, ref, tol) -> dict[str, Any]:
    try:
        from curvlinops import HessianLinearOperator  # noqa: PLC0415
        from scipy.sparse.linalg import eigsh  # noqa: PLC0415
    except ImportError as exc:
        return {"skipped": f"curvlinops not installed ({exc})"}
    model = model.float().to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    op = HessianLinearOperator(model, nn.CrossEntropyLoss(), params, batches,
                               check_deterministic=False).to_scipy()
    count = {"n": 0}
    matvec = op.matvec

    def counting(v):
        count["n"] += 1
        return matvec(v)

    op.matvec = counting
    out = {}
    for which in ("LA", "SA"):
        count["n"] = 0
        value, secs = timed(lambda: float(eigsh(op, k=1, which=which, tol=tol, return_eigenvectors=False)[0]), device)
        out[which] = {"seconds": secs, "value": value, "matvecs": count["n"]}
    out["seconds"] = out["LA"]["seconds"] + out["SA"]["seconds"]
    out.update(rel_errors(out["LA"]["value"], out["SA"]["value"], ref))
    return out


def compare_on_class(model, classes, c, args, device) -> dict[str, Any]:
    x, y = classes[c]
    batches = spectra.as_batches(x.to(device), y.to(device), args.batch_size)
    result: dict[str, Any] = {"class": c, "samples": len(y)}
    H64 = operator(model, batches, args, device, dtype=torch.float64)
    ref_tol = 1e-8
    ref, secs = timed(lambda: spectra.eigenvalues(H64, tol=ref_tol, max_iter=300, progress=True), device)
    result["reference"] = {"lambda_max": ref.lambda_max, "lambda_min": ref.lambda_min, "tol": ref_tol,
                           "hvps": ref.num_matvecs, "seconds": secs, "converged": ref.converged}
    refd = result["reference"]
    H = operator(model, batches, args, device)
    result["dim"] = H.dim
    result["products"] = bench_products(H, device)
    result["spectra"] = bench_spectra(H, refd, device, args.tol, args.block_sizes)
    dens, secs = timed(lambda: spectra.density(operator(model, batches, args, device), num_probes=4, num_steps=80), device)
    result["spectra_density_4x80_s"] = secs
    if not args.skip_others:
        result["pyhessian"] = bench_pyhessian(model, x, y, device, refd)
        result["curvlinops"] = bench_curvlinops(model, batches, device, refd, args.tol)
    best = min(result["spectra"].values(), key=lambda r: r["seconds"])
    ratios = {"spectra_best_s": best["seconds"]}
    for tool in ("pyhessian", "curvlinops"):
        if "seconds" in result.get(tool, {}):
            ratios[f"{tool}_over_spectra"] = result[tool]["seconds"] / best["seconds"]
    result["ratios"] = ratios
    return result


def all_classes(model, classes, args, device) -> dict[str, Any]:
    per_class, total_eigs, total_density = {}, 0.0, 0.0
    for c, (x, y) in classes.items():
        data = spectra.as_batches(x.to(device), y.to(device), args.batch_size)
        H = operator(model, data, args, device)
        res, secs = timed(lambda: spectra.eigenvalues(H, tol=args.tol, block_size=args.block_sizes[-1]), device)
        dens, dsecs = timed(lambda: spectra.density(H, num_probes=4, num_steps=80), device)
        per_class[c] = {"samples": len(y), "lambda_max": res.lambda_max, "lambda_min": res.lambda_min,
                        "hvps": res.num_matvecs, "eigs_s": secs, "density_s": dsecs, "converged": res.converged}
        total_eigs += secs
        total_density += dsecs
        print(f"  class {c}: n={len(y)} λmax={res.lambda_max:.4g} λmin={res.lambda_min:.4g} "
              f"{res.num_matvecs} HVPs {secs:.2f}s, density {dsecs:.2f}s", flush=True)
    return {"per_class": per_class, "eigs_total_s": total_eigs, "density_total_s": total_density,
            "block_size": args.block_sizes[-1], "tol": args.tol}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--arch", default="resnet8", help="a spectra built-in: resnet8 (small, CPU), resnet32, ...")
    p.add_argument("--checkpoint", help="load weights from a checkpoint instead of a random init")
    p.add_argument("--dataset", default="cifar10-lt")
    p.add_argument("--data-root", help="CIFAR root in the standard python format")
    p.add_argument("--max-samples", type=int, help="keep about N images of the data set (dry runs)")
    p.add_argument("--samples", type=int, default=30, help="per class when no --data-root (×10 images read)")
    p.add_argument("--compare-class", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="HVP batch size (default: the whole class)")
    p.add_argument("--tol", type=float, default=1e-4)
    p.add_argument("--block-sizes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--all-classes", action="store_true")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the HVP (needs --batch-size: one static padded shape); "
                        "the first product, timed in 'products', pays the compilation")
    p.add_argument("--skip-others", action="store_true", help="spectra only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="bench.json")
    args = p.parse_args()
    if args.compile and not args.batch_size:
        p.error("--compile needs --batch-size")
    device = torch.device(args.device)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    model = build(args)
    classes, source = load_classes(args)
    report: dict[str, Any] = {"machine": machine(device), "data": source, "arch": args.arch,
                              "tf32": False, "compile": args.compile, "dtype": "float32 (reference float64)"}
    print(f"[{report['machine']}] {args.arch}, {source}", flush=True)
    report["compare"] = compare_on_class(model, classes, args.compare_class, args, device)
    print(json.dumps(report["compare"], indent=1), flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))  # kept if the per-class part is cut short
    if args.all_classes:
        report["all_classes"] = all_classes(model, classes, args, device)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
