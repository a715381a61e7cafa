"""The demo: train, analyse per class, plot — on a laptop CPU, with no download.

:func:`run_demo` tells the paper's story end to end on the small real
CIFAR-10 sample shipped in ``data/cifar10_lt_sample.npz`` (1,017 long-tailed
training images, 500 test images, exact original pixels; see
``data/README.md``):

1. writes the sample as standard ``cifar-10-batches-py`` pickles into
   ``OUT/data`` (so the checkpoints describe their data and every ``spectra``
   command works on them with ``--data-root OUT/data``);
2. trains a ResNet-8 (``resnet8`` of ``spectra.models``) with CE + DRW and with
   CE + DRW + SAM (:func:`spectra.train.fit`), DRW switching on half-way;
3. sweeps the chosen checkpoints × classes into ``OUT/results.h5``
   (:func:`spectra.sweep.run_sweep`): λmax and λmin of the per-class Hessian
   ``H_c = ∇²_θ (1/N_c) Σ_{i: y_i=c} CE(f_θ(x_i), y_i)`` (model in eval mode, the
   first ``samples_per_class`` samples of class c), and the spectral density
   (SLQ) of the tail class at the last epoch of both runs;
4. draws ``OUT/ratio.png`` (|λmin/λmax| per class over epochs, one panel per
   method) and ``OUT/density.png`` (the tail class's density, both methods).

Rerunning with the same settings reuses what is there (training resumes from
``last.pt``, the sweep skips stored entries). Progress bars go to stderr.
"""
from __future__ import annotations

import dataclasses
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

__all__ = [
    "SAMPLE_FILE",
    "DEMO_ARCH",
    "METHODS",
    "DemoConfig",
    "DemoResult",
    "DemoError",
    "MIN_EPOCHS",
    "sample_path",
    "load_sample",
    "write_cifar_batches",
    "run_demo",
]

SAMPLE_FILE = "cifar10_lt_sample.npz"
# Import spec of the demo network (the built-in registry starts at ResNet-20).
DEMO_ARCH = "resnet8"  # spectra.models registry
# The two methods compared, as run-folder names (= training presets).
METHODS = ("ce-drw", "ce-drw-sam")
_BATCHES_FOLDER = "cifar-10-batches-py"
# Fewest epochs of a demo: DRW switches on after drw_epoch >= 1 completed epochs,
# before the last one.
MIN_EPOCHS = 2


class DemoError(RuntimeError):
    """The demo cannot run (sample missing, output folder unusable); one line."""


# ------------------------------------------------------------------ settings
@dataclass(frozen=True)
class DemoConfig:
    """Every setting of the demo. :meth:`quick` is the reduced one of the tests.

    Training: ``epochs`` of SGD (momentum 0.9, batch ``batch_size``, base lr
    ``lr`` with ``warmup_epochs`` of linear warm-up, ×0.1 after
    ``lr_decay_epoch``); DRW's class weights switch on after ``drw_epoch``
    completed epochs; SAM uses ``rho`` (0.1: with the paper's CIFAR-10 value 0.5
    this small network, trained for 12 epochs, fell to 23 % test accuracy;
    with 0.1 SAM beats CE+DRW, 37.6 % vs 33.0 %, tail 43.6 % vs 28.6 %).
    ``train_images`` caps the training set
    (stratified, every class kept; None = all 1,017).

    Analysis: ``sweep_epochs`` are the checkpoints analysed (every class in
    ``classes``, or all); the Hessian of a class uses its first
    ``samples_per_class`` samples, Lanczos stops at relative residual ``tol``
    or after ``max_iter`` products per end. The density of ``density_class``
    (None: the rarest class) at the last epoch uses ``density_probes`` probes
    of ``density_steps`` Lanczos steps.

    ``threads``: torch's intra-op threads while the demo runs (None: leave
    torch's default). One thread is the default because these small batches
    gain little from a second thread, and on a machine whose cores are busy
    with other work OpenMP threads that wait for each other made Hessian
    products here 25× slower (0.13 s vs 3.3 s for one product on 24 images).
    """

    epochs: int = 12
    drw_epoch: int = 6
    lr_decay_epoch: int = 9
    warmup_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.1
    rho: float = 0.1
    train_images: int | None = None
    test_images: int | None = None
    sweep_epochs: tuple[int, ...] = (2, 4, 6, 8, 10, 12)
    classes: tuple[int, ...] | None = None
    samples_per_class: int = 24
    tol: float = 1e-2
    max_iter: int = 40
    density_class: int | None = None
    density_probes: int = 2
    density_steps: int = 30
    seed: int = 0
    threads: int | None = 1

    @classmethod
    def quick(cls) -> "DemoConfig":
        """Seconds instead of minutes: 3 epochs on 200 images, 2 checkpoints,
        3 classes (head, middle, tail), 8 samples per class."""
        return cls(epochs=3, drw_epoch=1, lr_decay_epoch=2, train_images=200, test_images=100,
                   sweep_epochs=(1, 3), classes=(0, 5, 9), samples_per_class=8, tol=5e-2, max_iter=20,
                   density_probes=1, density_steps=10)

    def replace(self, **changes: Any) -> "DemoConfig":
        """A copy with ``changes`` (validated)."""
        new = dataclasses.replace(self, **changes)
        new.validate()
        return new

    def validate(self) -> None:
        if not 1 <= self.drw_epoch < self.epochs:
            raise DemoError(f"drw_epoch must be in [1, epochs); got {self.drw_epoch} with {self.epochs} epochs")
        if not 1 <= self.lr_decay_epoch < self.epochs:  # the rate drops after it: at the last epoch or later, never
            raise DemoError(f"lr_decay_epoch must be in [1, epochs); got {self.lr_decay_epoch} with {self.epochs} epochs")
        if not 0 <= self.warmup_epochs < self.epochs:  # a warm-up over the whole run would hide the decay
            raise DemoError(f"warmup_epochs must be in [0, epochs); got {self.warmup_epochs} with {self.epochs} epochs")
        bad = [e for e in self.sweep_epochs if not 1 <= e <= self.epochs]
        if bad or not self.sweep_epochs:
            raise DemoError(f"sweep_epochs must be within 1..{self.epochs}; got {list(self.sweep_epochs)}")
        if self.samples_per_class < 1:
            raise DemoError("samples_per_class must be >= 1")


@dataclass
class DemoResult:
    """What the demo wrote, and how long each stage took (seconds)."""

    out: Path
    results: Path
    ratio_png: Path
    density_png: Path
    runs: dict[str, Path]
    summaries: dict[str, dict[str, Any]]
    timings: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------- data
def sample_path() -> Path:
    """The shipped sample: ``data/cifar10_lt_sample.npz`` beside the package
    (a checkout or an editable install)."""
    import spectra

    path = Path(spectra.__file__).resolve().parents[1] / "data" / SAMPLE_FILE
    if not path.is_file():
        raise DemoError(
            f"the demo's data sample is missing: {path} (it ships in the repository's data/ folder; "
            "use a git checkout with `pip install -e .`, or rebuild it with data/build_sample.py)"
        )
    return path


def load_sample(path: str | Path | None = None) -> dict[str, np.ndarray]:
    """The sample's arrays: ``x_train``/``x_test`` uint8 NHWC, ``y_*`` labels,
    ``*_indices`` (indices into the official CIFAR-10 splits), ``class_names``."""
    path = Path(path) if path is not None else sample_path()
    if not path.is_file():
        raise DemoError(f"data sample not found: {path}")
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def write_cifar_batches(sample: dict[str, np.ndarray], root: str | Path) -> Path:
    """Write the sample as ``root/cifar-10-batches-py`` in the official format.

    Rows are 3072 bytes (1024 red, 1024 green, 1024 blue, each row-major 32×32);
    the training images are spread over ``data_batch_1..5`` in order, so the
    files' order is the sample's (class-major); ``test_batch`` holds the test
    images and ``batches.meta`` the class names. Returns the folder.
    """
    folder = Path(root) / _BATCHES_FOLDER
    folder.mkdir(parents=True, exist_ok=True)

    def rows(images: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(images.transpose(0, 3, 1, 2).reshape(len(images), 3072))

    def dump(name: str, obj: dict[str, Any]) -> None:
        tmp = folder / f".{name}.tmp"
        with open(tmp, "wb") as fh:
            pickle.dump(obj, fh, protocol=4)
        tmp.replace(folder / name)

    parts = np.array_split(np.arange(len(sample["y_train"])), 5)
    for i, part in enumerate(parts, start=1):
        dump(f"data_batch_{i}", {"data": rows(sample["x_train"][part]),
                                 "labels": sample["y_train"][part].astype(int).tolist(),
                                 "batch_label": f"spectra demo sample, training part {i} of 5"})
    dump("test_batch", {"data": rows(sample["x_test"]), "labels": sample["y_test"].astype(int).tolist(),
                        "batch_label": "spectra demo sample, test"})
    dump("batches.meta", {"label_names": [str(n) for n in sample["class_names"]], "num_vis": 3072})
    return folder


# ---------------------------------------------------------------- the stages
def _check_results_file(results: Path) -> None:
    """Open and close ``results`` as the demo's results writer: a file that is
    not a spectra results file, or one another process is writing, is a
    :class:`DemoError` before any work (an existing results file is kept)."""
    from .store import ResultsWriter, StoreError

    try:
        with ResultsWriter(results):
            pass
    except StoreError as exc:
        raise DemoError(f"{str(exc).splitlines()[0]}; remove it or choose another --out") from None


def _train_configs(config: DemoConfig, data_root: Path, progress: bool) -> dict[str, Any]:
    from .train import resolve_config

    common = dict(
        # The sample is long-tailed already: the balanced name keeps it as it is.
        data_root=str(data_root), arch=DEMO_ARCH, epochs=config.epochs, batch_size=config.batch_size,
        lr=config.lr, warmup_epochs=config.warmup_epochs, lr_milestones=[config.lr_decay_epoch],
        lr_factors=[0.1], drw_epoch=config.drw_epoch, save_every=1, device="cpu", compile="off",
        max_train_samples=config.train_images, max_test_samples=config.test_images, seed=config.seed,
        progress=progress,
    )
    configs = {}
    for method in METHODS:
        extra = {"rho": config.rho} if method.endswith("sam") else {}
        configs[method] = resolve_config(method, "cifar10", **common, **extra)
    return configs


def _train(config: DemoConfig, data_root: Path, runs_dir: Path, progress: bool,
           log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """Train both methods (resuming a run already in its folder); their summaries."""
    from .train import fit

    summaries = {}
    for method, train_config in _train_configs(config, data_root, progress).items():
        run = runs_dir / method
        resume = (run / "last.pt").is_file()
        try:
            result = fit(train_config, run, resume=resume, log=log)
        except ValueError as exc:
            if resume:
                raise DemoError(f"{run} holds a run with other settings ({exc}); choose another --out") from None
            raise
        s = result.summary
        log(f"  {method}: test accuracy {s['final']['acc']:.1f}% (tail classes {s['tail_classes']}: "
            f"{s['final']['tail_acc']:.1f}%), {s['wall_time_s']:.0f} s")
        summaries[method] = s
    return summaries


def _sweep(checkpoints: Sequence[Path], out: Path, classes: Any, kind: str, config: DemoConfig,
           data_root: Path, progress: bool, desc: str) -> None:
    """One :func:`run_sweep` with a progress bar; any failed job is an error."""
    from .analysis import AnalysisSettings
    from .class_data import DataOptions
    from .progress import progress_bar
    from .sweep import SweepEvent, run_sweep

    settings = AnalysisSettings(kind=kind, top_k=1, bottom_k=1, tol=config.tol, max_iter=config.max_iter,
                                probes=config.density_probes, steps=config.density_steps, seed=config.seed,
                                dtype="float32")
    data = DataOptions(root=str(data_root), split="train", max_samples=config.samples_per_class,
                       batch_size=256, device="cpu")
    bar = progress_bar(total=None, desc=desc, unit="job", enabled=progress)

    def on_event(event: SweepEvent) -> None:
        if event.total and bar.total != event.total:
            bar.total = event.total
            bar.refresh()
        bar.update(1)
        if event.status == "done" and event.record is not None and kind == "eigs":
            a = event.record.arrays
            bar.set_postfix_str(f"{event.checkpoint.parent.name} ep {event.epoch} class {event.class_index}: "
                                f"λmax {a['top'][0]:.3g} λmin {a['bottom'][0]:.3g}")

    try:
        summary = run_sweep(checkpoints, out, classes=classes, kinds=(kind,), settings=settings,
                            data_options=data, progress=on_event)
    finally:
        bar.close()
    if summary.failed:
        raise DemoError(f"{len(summary.failed)} analysis job(s) failed; first: {summary.failed[0]}")


def _plot(results: Path, out: Path, config: DemoConfig, density_class: int, last_epoch: int,
          train_images: int) -> tuple[Path, Path]:
    from . import results_query
    from .plots import plot_density, plot_ratio, save_figure

    names, sizes = results_query.class_names(results), results_query.class_sizes(results)
    tables = {run: results_query.eigen_table(results, run=run) for run in METHODS}
    fig = plot_ratio(tables, names, sizes, title=(
        f"Per-class Hessian |λmin/λmax| — demo: ResNet-8, {train_images} long-tailed CIFAR-10 images, "
        f"{config.epochs} CPU epochs"))
    for ax in fig.axes:
        if ax.get_title() in METHODS:  # mark where DRW's re-weighting starts
            ax.axvline(config.drw_epoch + 0.5, color="grey", linestyle=":", linewidth=1.0)
            ax.text(config.drw_epoch + 0.6, 1.0, "DRW on", transform=ax.get_xaxis_transform(),
                    fontsize=8, color="grey", va="top")
    ratio_png = save_figure(fig, out / "ratio.png", dpi=110)
    records = [results_query.density_record(results, density_class, last_epoch, run=run) for run in METHODS]
    name = names.get(density_class, str(density_class))
    density_png = out / "density.png"
    plot_density(records, out=density_png, title=(
        f"Hessian spectral density, tail class {density_class} ({name}, "
        f"{records[0].provenance['num_samples']} samples), epoch {last_epoch}: CE+DRW vs CE+DRW+SAM"))
    return ratio_png, density_png


def run_demo(out: str | Path, config: DemoConfig | None = None, progress: bool = True,
             log: Callable[[str], None] | None = None, sample: str | Path | None = None) -> DemoResult:
    """Run the whole demo into ``out``; see the module docstring.

    ``sample``: another ``.npz`` in the sample's layout (default: the shipped
    one). Raises :class:`DemoError` with a one-line message on unusable input.
    """
    config = config or DemoConfig()
    config.validate()
    previous_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        return _run(out, config, progress, log, sample)
    finally:
        torch.set_num_threads(previous_threads)


def _run(out: str | Path, config: DemoConfig, progress: bool, log: Callable[[str], None] | None,
         sample: str | Path | None) -> DemoResult:
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    results = out / "results.h5"
    _check_results_file(results)  # a foreign or locked file fails now, not after training

    log(f"[1/4] data: writing the CIFAR-10 sample into {out / 'data'}")
    arrays = load_sample(sample)
    data_root = out / "data"
    write_cifar_batches(arrays, data_root)
    timings["data"] = time.perf_counter() - t0

    log(f"[2/4] training ResNet-8 with {' and '.join(METHODS)} for {config.epochs} epochs "
        f"(DRW from epoch {config.drw_epoch + 1})")
    t = time.perf_counter()
    runs_dir = out / "runs"
    summaries = _train(config, data_root, runs_dir, progress, log)
    timings["train"] = time.perf_counter() - t

    checkpoints = [runs_dir / m / f"ckpt_epoch{e:04d}.pt" for m in METHODS for e in sorted(set(config.sweep_epochs))]
    classes: Any = "all" if config.classes is None else list(config.classes)
    log(f"[3/4] per-class Hessians: λmax, λmin of {len(checkpoints)} checkpoints × "
        f"{'every class' if config.classes is None else f'classes {list(config.classes)}'} → {results}")
    t = time.perf_counter()
    _sweep(checkpoints, results, classes, "eigs", config, data_root, progress, "eigs")
    counts = next(iter(summaries.values()))["class_counts"]
    candidates = list(range(len(counts))) if config.classes is None else list(config.classes)
    density_class = config.density_class if config.density_class is not None else min(
        candidates, key=lambda c: (counts[c], -c))
    last = max(config.sweep_epochs)
    _sweep([runs_dir / m / f"ckpt_epoch{last:04d}.pt" for m in METHODS], results, [density_class], "density",
           config, data_root, progress, "density")
    timings["analysis"] = time.perf_counter() - t

    log("[4/4] plots")
    t = time.perf_counter()
    train_images = int(next(iter(summaries.values()))["train_images"])
    ratio_png, density_png = _plot(results, out, config, density_class, last, train_images)
    timings["plots"] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    log(f"done in {timings['total']:.0f} s: {results}, {ratio_png}, {density_png}")
    return DemoResult(out=out, results=results, ratio_png=ratio_png, density_png=density_png,
                      runs={m: runs_dir / m for m in METHODS}, summaries=summaries, timings=timings)
