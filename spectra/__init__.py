"""spectra: per-class Hessian spectral analysis for PyTorch.

The Hessian studied is ``H = ∇²_θ (1/N) Σ_i ℓ(f_θ(x_i), y_i)`` — the Hessian
of the **mean** loss over every sample of a (class-filtered) data set, w.r.t.
the chosen parameters θ, with the model in eval mode by default. Products
``H @ v`` are exact (autodiff: double backward on CPUs, forward-over-reverse on GPUs
by default); eigenvalues come from
restarted block Lanczos with residual-based stopping, densities from
stochastic Lanczos quadrature, traces from Hutchinson / Hutch++.

Example::

    import torch, spectra
    H = spectra.HessianOperator(model, torch.nn.CrossEntropyLoss(),
                                spectra.class_subset((x, y), 9), dtype=torch.float64)
    res = spectra.eigenvalues(H, k=1, which="both", tol=1e-6)
    print(res.top[0], res.bottom[0], res.top_residuals, res.bottom_residuals)
"""
from __future__ import annotations

from .data import as_batches, class_subset
from .density import DensityResult, density
from .eigenvalues import EigenResult, eigenvalues
from .operator import HessianOperator
from .trace import TraceResult, trace

__version__ = "0.1.0"

# Loading, data sets and results: imported on first use (they pull in h5py etc.).
_LAZY = {
    "load_checkpoint": ("checkpoints", "load_checkpoint"),
    "LoadedCheckpoint": ("checkpoints", "LoadedCheckpoint"),
    "build_model": ("models", "build_model"),
    "DatasetSpec": ("datasets", "DatasetSpec"),
    "load_dataset": ("datasets", "load_dataset"),
    "run_sweep": ("sweep", "run_sweep"),
    "store": ("store", None),
    "results_query": ("results_query", None),
    "plots": ("plots", None),
    "train": ("train", None),
    "distributed": ("distributed", None),
}


def __getattr__(name: str):  # PEP 562: lazy public names
    if name not in _LAZY:
        raise AttributeError(f"module 'spectra' has no attribute {name!r}")
    import importlib

    module_name, attr = _LAZY[name]
    module = importlib.import_module(f"{__name__}.{module_name}")
    return module if attr is None else getattr(module, attr)

__all__ = [
    "HessianOperator",
    "eigenvalues",
    "EigenResult",
    "density",
    "DensityResult",
    "trace",
    "TraceResult",
    "class_subset",
    "as_batches",
    "load_checkpoint",
    "LoadedCheckpoint",
    "build_model",
    "DatasetSpec",
    "load_dataset",
    "run_sweep",
    "store",
    "results_query",
    "plots",
    "train",
    "distributed",
    "__version__",
]
