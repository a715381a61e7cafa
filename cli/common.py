"""Options and error handling shared by the analysis, plot and info commands.

Every command is wrapped by :func:`handle_errors`: library errors caused by
the user's input (missing files, unknown architectures, key mismatches,
classes out of range, foreign or locked results files, unwritable outputs)
become one ``Error: ...`` line on stderr and exit status 1, never a traceback.
Under ``torchrun`` only rank 0 prints that line; the other ranks exit 1 quietly.
"""
from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import sys
import time
import warnings
from typing import Any, Callable, Iterable, Iterator, NoReturn, Sequence

import click
import numpy as np
from tqdm.auto import tqdm

from spectra import distributed as sd
from spectra.analysis import KINDS, LOSSES, AnalysisSettings, LoadOptions
from spectra.class_data import DataOptions
from spectra.eigenvalues import MIN_PRODUCTS
from spectra.store import ResultRecord
from spectra.trace import MIN_PROBES

__all__ = [
    "handle_errors",
    "distributed_session",
    "checkpoint_options",
    "data_options",
    "compute_options",
    "eigs_options",
    "density_options",
    "trace_options",
    "output_options",
    "FiniteFloatRange",
    "FigurePath",
    "check_analysis_options",
    "load_options_from",
    "data_options_from",
    "settings_from",
    "record_to_json",
    "emit_json",
    "format_table",
    "fmt",
    "compose",
]

Decorator = Callable[[Callable[..., Any]], Callable[..., Any]]


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, KeyError) and exc.args:
        text = str(exc.args[0])
    elif isinstance(exc, OSError) and exc.strerror and exc.filename and str(exc).startswith("[Errno"):
        text = f"{exc.strerror}: {exc.filename}"
    elif isinstance(exc, OSError) and exc.filename and str(exc.filename) not in str(exc):
        text = f"{str(exc).strip() or type(exc).__name__}: {exc.filename}"  # name the file h5py could not read
    else:
        text = str(exc)
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def quiet_rank() -> bool:
    """A torchrun rank other than 0: it reports nothing (rank 0 says it once)."""
    return os.environ.get("RANK", "0") != "0"


QUIET_EXIT_DELAY_S = 2.0


def exit_quiet_rank() -> NoReturn:
    """Exit a failing torchrun rank other than 0 silently (status 1), a moment late: rank 0
    met the same error and prints it, and torchrun stops every rank once one has exited,
    which could cut rank 0 off before its message."""
    time.sleep(QUIET_EXIT_DELAY_S)
    raise SystemExit(1)


def handle_errors(func: Callable[..., Any]) -> Callable[..., Any]:
    """Turn expected failures into ``click.ClickException`` (one line, exit 1)."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # on torchrun ranks other than 0 the command group's main keeps the error quiet (rank 0 prints it)
        with _one_line_warnings():
            return _as_click_error(func, *args, **kwargs)

    return wrapper


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    """Show each distinct warning of a command once, as one ``Warning: ...`` line on
    stderr (e.g. a damaged results entry that readers skip, met by several reads)."""
    shown: set[str] = set()

    def show(message: Any, category: Any, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
        text = _one_line(message) if isinstance(message, BaseException) else str(message).strip().split("\n")[0]
        if text not in shown and not quiet_rank():
            shown.add(text)
            tqdm.write(f"Warning: {text}", file=sys.stderr)  # above a running progress bar, not inside its line

    with warnings.catch_warnings():
        warnings.simplefilter("always")  # dedup is ours: per message, not per code location
        warnings.showwarning = show
        yield


def _as_click_error(func: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``func``; an expected failure becomes a one-line ``ClickException``."""
    try:
        return func(*args, **kwargs)
    except click.ClickException:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        # OSError covers h5py's file errors; ValueError the loaders' and
        # AnalysisError/CheckpointError; RuntimeError download failures
        # and model/data mismatches raised inside torch.
        raise click.ClickException(_one_line(exc)) from None
    except Exception as exc:  # library errors with their own base (StoreError)
        if type(exc).__module__.startswith("spectra"):
            raise click.ClickException(_one_line(exc)) from None
        raise


@contextlib.contextmanager
def distributed_session(opts: dict[str, Any]) -> Iterator[sd.DistContext]:
    """Join the ``torchrun`` job (nothing to join in a plain process) for one command.

    ``opts["device"]`` becomes this rank's device: ``auto``/``cuda`` pick
    ``cuda:LOCAL_RANK`` under torchrun (NCCL), the CPU uses gloo. The group
    is destroyed when the command ends.
    """
    wanted = opts.get("device")
    with sd.distributed_session(device=None if wanted in (None, "", "auto") else wanted) as ctx:
        if ctx.is_distributed:
            opts["device"] = str(ctx.device)
        yield ctx


def compose(*decorators: Decorator) -> Decorator:
    def apply(func: Callable[..., Any]) -> Callable[..., Any]:
        for decorator in reversed(decorators):
            func = decorator(func)
        return func

    return apply


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not valid JSON ({exc.msg}): {value}") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter("expected a JSON object such as '{\"num_classes\": 10}'")
    return parsed


class FiniteFloatRange(click.FloatRange):
    """A float in a range that is also finite: click's ``FloatRange`` lets NaN
    through (every comparison with NaN is false) and ±inf when a side is open-ended."""

    name = "finite float"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


class FigurePath(click.Path):
    """A figure file to be written later, checked before any work is done so a
    long computation is not lost to a bad name (:func:`spectra.plots.image_path`:
    existing writable folder, a format matplotlib writes; no suffix → ``.png``)."""

    def __init__(self) -> None:
        super().__init__(dir_okay=False)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from spectra.plots import image_path

        try:
            return str(image_path(super().convert(value, param, ctx)))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


checkpoint_options = compose(
    click.option("--arch", default=None, metavar="NAME",
                 help="Architecture for plain state_dicts: a built-in (resnet32, ...) or package.module:Class."),
    click.option("--arch-kwargs", default=None, metavar="JSON", callback=_json_object,
                 help='Keyword arguments of the architecture, e.g. \'{"num_classes": 100, "cosine_head": true}\'.'),
    click.option("--trust-checkpoint", is_flag=True,
                 help="Allow full unpickling (e.g. a pickled nn.Module). This can run code from the file: "
                      "only for checkpoints from a source you trust."),
)

data_options = compose(
    click.option("--dataset", default=None, metavar="NAME|pkg.mod:func",
                 help="cifar10, cifar100, cifar10-lt, cifar100-lt, or a factory returning a Dataset or "
                      "(inputs, targets). Default: the data set the checkpoint records."),
    click.option("--data-root", default=None, type=click.Path(file_okay=False),
                 help="Folder with cifar-10-batches-py / cifar-100-python (default: $SPECTRA_DATA_ROOT, else the "
                      "root the checkpoint recorded if it exists here, else $XDG_CACHE_HOME/spectra/data)."),
    click.option("--split", type=click.Choice(["train", "test"]), default="train", show_default=True),
    click.option("--imbalance-ratio", type=FiniteFloatRange(min=1), default=None,
                 help="Long-tailed ratio n_max/n_min (default 100)."),
    click.option("--profile", type=click.Choice(["exp", "step"]), default=None, help="Long-tailed profile."),
    click.option("--lt-seed", type=click.IntRange(0, 2 ** 32 - 1), default=None,
                 help="Seed of the long-tailed subsampling (default 0)."),
    click.option("--download", is_flag=True, help="Fetch the official CIFAR archive (checks its md5)."),
    click.option("--max-samples", type=click.IntRange(min=1), default=None,
                 help="Use at most this many samples per class (the first ones)."),
    click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True),
    click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, or auto."),
)

compute_options = compose(
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True),
    click.option("--seed", type=click.IntRange(0, 2 ** 63 - 1), default=0, show_default=True,
                 help="Seed of the random start/probe vectors."),
    click.option("--params", "param_patterns", multiple=True, metavar="PATTERN",
                 help="Restrict the Hessian to parameters matching this name or fnmatch pattern "
                      "(repeatable), e.g. 'layer3.*' or 'linear.weight'."),
    click.option("--loss", type=click.Choice(sorted(LOSSES)), default="ce", show_default=True,
                 help="Loss whose Hessian is analysed: ce = mean cross-entropy; ldam, vs = the training losses (margins / logit scaling from the class counts; class weights cancel within a class)."),
    click.option("--hvp", "hvp_method", type=click.Choice(["auto", "forward-over-reverse", "double-backward"]),
                 default="auto", show_default=True,
                 help="How Hessian-vector products are formed (all exact): auto = double backward on a CPU, "
                      "forward-over-reverse (vmap over blocks of vectors) on a GPU."),
    click.option("--keep-graph/--no-keep-graph", default=None,
                 help="Keep the double-backward gradient graph of every batch between products: each product "
                      "is then one backward pass (about 1.9x faster on CPUs) at the memory cost of all batches' "
                      "activations and gradient graph. Default: kept only when the class fits one batch "
                      "(no extra peak memory); --no-keep-graph never keeps it."),
    click.option("--cuda-graphs/--no-cuda-graphs", default=None,
                 help="Replay Hessian-vector products as CUDA graphs (batches padded exactly to power-of-two "
                      "shapes, each captured once and checked against an eager product; ~3x faster products "
                      "on an H200). Default: on for CUDA devices unless --hvp double-backward or --keep-graph."),
)

eigs_options = compose(
    click.option("--top-k", type=click.IntRange(min=0), default=1, show_default=True, help="Largest eigenvalues."),
    click.option("--bottom-k", type=click.IntRange(min=0), default=1, show_default=True, help="Smallest eigenvalues."),
    click.option("--tol", type=FiniteFloatRange(min=0, max=1, min_open=True, max_open=True), default=1e-5,
                 show_default=True, help="Relative residual tolerance ||Hv-λv|| <= tol·max|λ|, tested from "
                                         f"product {MIN_PRODUCTS} on (a smaller Krylov space can pass a near-zero bulk "
                                         "value as λmin)."),
    click.option("--max-iter", type=click.IntRange(min=1), default=200, show_default=True,
                 help="Hessian-vector products allowed for the Lanczos iteration (at least top-k + bottom-k); "
                      "measuring the final residuals adds max(top-k, bottom-k) more per end asked for "
                      f"(so --max-iter 2 spends at most 4 with the defaults); below {MIN_PRODUCTS} a result is "
                      "never marked converged."),
)

density_options = compose(
    click.option("--probes", type=click.IntRange(min=1), default=4, show_default=True, help="SLQ probe vectors."),
    click.option("--steps", type=click.IntRange(min=1), default=80, show_default=True, help="Lanczos steps per probe."),
    click.option("--sigma", type=FiniteFloatRange(min=0, min_open=True), default=None,
                 help="Gaussian kernel width (default: sqrt(1e-5·max(1, spread)))."),
)

trace_options = compose(
    click.option("--trace-probes", type=click.IntRange(min=min(MIN_PROBES.values())), default=30, show_default=True,
                 help="Hessian-vector products spent on the trace (hutch++: at least 4, hutchinson: 2)."),
    click.option("--trace-method", type=click.Choice(["hutch++", "hutchinson"]), default="hutch++",
                 show_default=True),
)

output_options = compose(
    click.option("--out", "out", default=None, type=click.Path(dir_okay=False), metavar="RESULTS.h5",
                 help="Also store the results in this HDF5 file."),
    click.option("--json", "as_json", is_flag=True, help="Print a machine-readable JSON result (only that) on stdout."),
)


def check_analysis_options(opts: dict[str, Any], kinds: Iterable[str]) -> None:
    """Refuse option combinations that cannot give the answer asked for, before any work.

    eigs: the Lanczos basis needs a column per wanted eigenvalue, so
    ``--max-iter >= --top-k + --bottom-k`` (else the ends share Ritz values).
    trace: each method's minimum number of probes (:data:`spectra.trace.MIN_PROBES`).
    """
    kinds = set(kinds)
    if "eigs" in kinds:
        wanted = opts["top_k"] + opts["bottom_k"]
        if 0 < wanted and opts["max_iter"] < wanted:
            raise click.BadParameter(
                f"{opts['max_iter']} is fewer than the {wanted} eigenvalues asked for (--top-k {opts['top_k']} "
                f"+ --bottom-k {opts['bottom_k']}), which need a Lanczos vector each; use {wanted} or more.",
                param_hint="'--max-iter'")
    if "trace" in kinds:
        method, probes = opts["trace_method"], opts["trace_probes"]
        if probes < MIN_PROBES[method]:
            raise click.BadParameter(f"{method} needs at least {MIN_PROBES[method]} probes, got {probes}.",
                                     param_hint="'--trace-probes'")


def load_options_from(opts: dict[str, Any]) -> LoadOptions:
    return LoadOptions(arch=opts.get("arch"), arch_kwargs=opts.get("arch_kwargs"),
                       trust=bool(opts.get("trust_checkpoint")))


def data_options_from(opts: dict[str, Any]) -> DataOptions:
    return DataOptions(
        dataset=opts.get("dataset"), root=opts.get("data_root"), split=opts.get("split", "train"),
        imbalance_ratio=opts.get("imbalance_ratio"), profile=opts.get("profile"), lt_seed=opts.get("lt_seed"),
        download=bool(opts.get("download")), max_samples=opts.get("max_samples"),
        batch_size=opts.get("batch_size", 1000), device=opts.get("device", "auto"),
    )


def settings_from(kind: str, opts: dict[str, Any]) -> AnalysisSettings:
    """Analysis settings from the parsed options (absent options keep defaults)."""
    assert kind in KINDS
    names = {
        "top_k": "top_k", "bottom_k": "bottom_k", "tol": "tol", "max_iter": "max_iter",
        "probes": "probes", "steps": "steps", "sigma": "sigma", "trace_probes": "trace_probes",
        "trace_method": "trace_method", "seed": "seed", "dtype": "dtype", "loss": "loss",
        "hvp_method": "hvp_method", "cuda_graphs": "cuda_graphs", "keep_graph": "keep_graph",
    }
    values = {field: opts[opt] for field, opt in names.items() if opt in opts}
    patterns = opts.get("param_patterns")
    values["params"] = tuple(patterns) if patterns else None
    return AnalysisSettings(kind=kind, **values)


def _jsonable(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()] if value.ndim else _jsonable(value.item())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def record_to_json(record: ResultRecord) -> dict[str, Any]:
    """A result as JSON: its provenance plus ``results`` (arrays as lists)."""
    return {**_jsonable(record.provenance), "results": _jsonable(record.arrays)}


def emit_json(payload: Any) -> None:
    """The command's only stdout output under ``--json``."""
    sys.stdout.write(json.dumps(_jsonable(payload), indent=2) + "\n")
    sys.stdout.flush()


def fmt(value: Any, digits: int = 4) -> str:
    """Compact number formatting for tables."""
    if value is None:
        return "-"
    if isinstance(value, (float, np.floating)):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.{digits}g}" if 1e-3 <= abs(value) < 1e5 or value == 0 else f"{value:.{digits - 1}e}"
    return str(value)


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned text columns, numbers right-aligned."""
    cells = [[fmt(v) for v in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    numeric = [all(_is_number(r[i]) for r in cells) and bool(cells) for i in range(len(headers))]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return text == "-"
    return True
