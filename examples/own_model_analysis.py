"""spectra inside someone else's analysis code: their own model, data set and
training loop; spectra only computes the per-class Hessian spectra.

The "user code" below is a plain PyTorch project: an imbalanced 3-class
problem (Gaussian clusters in 20 dimensions, 600 / 120 / 30 points), a small
MLP, a few epochs of Adam. Then, for each class c, spectra analyses

    H_c = ∇²_θ (1/N_c) Σ_{i: y_i = c} CE(f_θ(x_i), y_i)

(the Hessian of the mean loss over the class's samples, model in eval mode):
λmax and λmin with measured residuals, |λmin/λmax|, the trace (Hutch++), the
spectral density (SLQ), and λmax of the Hessian restricted to the last
layer; the densities go into the user's own matplotlib figure. (For
checkpoint files, ``spectra.sweep.run_sweep`` stores such results in an
HDF5 file with full provenance; see examples/per_layer_spectrum.py.)

    python examples/own_model_analysis.py [--epochs 30] [--plot own_model_density.png]
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import spectra


# ----------------------------------------------------------- the user's code
class ClusterDataset(Dataset):
    """The user's own map-style data set: (features, label) pairs."""

    def __init__(self, counts: list[int], dim: int = 20, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        centres = 2.0 * torch.randn(len(counts), dim, generator=g)
        self.x = torch.cat([centres[c] + torch.randn(n, dim, generator=g) for c, n in enumerate(counts)])
        self.targets = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
        self.classes = ["common", "rare", "very rare"]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.targets[i]


def make_model(dim: int = 20, classes: int = 3) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, classes))


def train(model: nn.Module, data: Dataset, epochs: int) -> None:
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(epochs):
        for x, y in DataLoader(data, batch_size=64, shuffle=True):
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()


# ----------------------------------------------------- spectra's part of it
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--plot", type=Path, default=Path("own_model_density.png"),
                        help="Figure of the per-class densities.")
    args = parser.parse_args()
    torch.set_num_threads(1)  # small products: a second OpenMP thread mostly waits (and thrashes on busy cores)

    torch.manual_seed(0)
    data = ClusterDataset([600, 120, 30])
    model = make_model()
    train(model, data, args.epochs)
    loss_fn = nn.CrossEntropyLoss()  # must return the batch MEAN (spectra weights batches by size)

    print(f"{'class':<10} {'n':>4} {'λmax':>10} {'λmin':>10} {'|λmin/λmax|':>12} {'residual':>9} "
          f"{'HVPs':>5} {'trace':>9} {'λmax, last layer':>17}")
    densities = {}
    for c, name in enumerate(data.classes):
        # spectra takes the user's Dataset; class_subset keeps class c's samples.
        subset = spectra.class_subset(data, c)
        H = spectra.HessianOperator(model, loss_fn, DataLoader(subset, batch_size=100), dtype=torch.float64)
        eig = spectra.eigenvalues(H, k=1, which="both", tol=1e-8)
        tr = spectra.trace(H, num_probes=30, method="hutch++", seed=0)
        # The same class's Hessian restricted to the last layer ("4.*": its weight and bias).
        H_last = spectra.HessianOperator(model, loss_fn, DataLoader(subset, batch_size=100), params=["4.*"],
                                         dtype=torch.float64)
        last = spectra.eigenvalues(H_last, k=1, which="top", tol=1e-8)
        residual = max(float(eig.top_residuals[0]), float(eig.bottom_residuals[0]))
        print(f"{name:<10} {len(subset):>4} {eig.lambda_max:>10.4g} {eig.lambda_min:>10.4g} "
              f"{abs(eig.lambda_min / eig.lambda_max):>12.3g} {residual:>9.1e} {eig.num_matvecs:>5} "
              f"{tr.estimate:>9.4g} {last.lambda_max:>17.4g}")
        densities[name] = spectra.density(H, num_probes=4, num_steps=40, seed=0)

    # The user's own figure (plain matplotlib, no display needed).
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, dens in densities.items():
        ax.semilogy(dens.grid, dens.values + 1e-12 * dens.values.max(), label=name)
    ax.set_xlabel("eigenvalue")
    ax.set_ylabel("density (log)")
    ax.set_title("Per-class Hessian spectral density of the user's MLP")
    ax.legend()
    fig.savefig(args.plot, dpi=100)
    print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
