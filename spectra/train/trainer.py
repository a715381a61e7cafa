"""The training loop: device-resident data, one static-shape step, optional
CUDA-graph capture / ``torch.compile``, evaluation, checkpoints and resume.

A step reads a fixed-size uint8 batch from static buffers, so the same Python
function runs eagerly or as a replayed CUDA graph. Everything that changes
between steps or epochs (batch, learning rate, class weights, noise) is
written into tensors outside the step; nothing inside it synchronises with
the host. Training loss and accuracy accumulate on the device and are read
once per epoch.

Determinism: model init uses ``torch.manual_seed(seed)``; all per-epoch
randomness (shuffle, crops, flips, PGD / LPF noise) comes from generators
seeded with ``(seed, epoch)``. Resuming from ``last.pt`` therefore replays the
exact same computation; on the CPU the resumed run ends with bit-identical
weights.

Data-parallel under ``torchrun`` (see ``docs/distributed.md``): every rank
draws the same global batch of ``batch_size`` images (same seeded generators)
and trains on its block of ``batch_size / W`` rows; gradients are averaged
over ranks after every backward (both SAM passes), and a weighted loss (DRW,
VS, LDAM class weights) is normalised by the class weights of the *global*
batch, so each update is that of one process with the global batch — except
BatchNorm, which normalises with each rank's own rows unless ``sync_bn``
(running statistics are averaged over ranks before every evaluation and
checkpoint). Rank 0 alone evaluates, logs and writes files.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as sd
from ..datasets import CIFAR_MEAN, CIFAR_STD, DatasetSpec, LoadedDataset, load_dataset
from ..graphed_product import CAPTURE_STREAMS, capture_graph
from ..models import MODELS, build_model
from .augment import EpochBatches, epoch_generator
from .checkpoint import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_VERSION,
    atomic_torch_save,
    atomic_write_json,
    checkpoint_name,
    load_training_checkpoint,
)
from .config import TrainConfig
from .evaluation import evaluate, tail_classes
from .losses import build_loss, effective_number_weights
from .noise import LPFNoise, pgd_perturbation, split_like
from .run_folder import (
    PRE_CHECKPOINT_FILES,
    check_out_dir_is_free,
    existing_run_files,
    listed,
    logged_epochs,
    readable_last,
    stored_memory_format,
    truncate_logs,
)
from .sam import global_grad_norm, sam_perturbation
from .schedule import drw_active, learning_rate
from .sgd import TensorLRSGD

__all__ = ["Trainer", "FitResult", "TrainingDiverged", "fit", "capture_step_graph", "resolve_device", "gradients_into"]

# Stream ids of epoch_generator: one independent random stream per purpose.
_DATA_STREAM, _NOISE_STREAM = 0, 1


def _spectra_version() -> str:
    try:
        from importlib.metadata import version

        return version("spectra-hessian")
    except Exception:  # not installed (running from a source tree)
        return "unknown"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; a CUDA request without CUDA is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available (use --device cpu)")
    return device


def channels_last_for(config: TrainConfig, device: torch.device) -> bool:
    """Whether the run computes in the channels_last memory format: ``config.channels_last``, or
    for ``None`` on CPUs only — oneDNN's NHWC convolutions made ResNet-32 steps 1.27× (CE) and
    1.31× (SAM) faster on a 2-core CPU; on GPUs fp32 NCHW is cuDNN's fast path (not measured
    otherwise). Only rounding changes: the same weights up to fp32 reordering."""
    return config.channels_last if config.channels_last is not None else device.type == "cpu"


class TrainingDiverged(RuntimeError):
    """The training loss (or a weight) became NaN or infinite; the message is one line."""


@dataclass
class FitResult:
    out_dir: Path
    summary: dict[str, Any]
    model: nn.Module
    already_complete: bool = False  # resumed a run that had finished: nothing trained, summary as stored


class _StepState:
    """Tensors a training step reads and writes (fixed addresses for graph replay)."""

    def __init__(self, batch_size: int, device: torch.device, num_params: int, noise_rows: int, channels_last: bool,
                 global_batch_size: int | None = None) -> None:
        self.x = torch.zeros(batch_size, 3, 32, 32, dtype=torch.uint8, device=device)
        self.y = torch.zeros(batch_size, dtype=torch.long, device=device)
        # Data-parallel: the labels of the whole global batch (for its class-weight sum).
        self.y_global = torch.zeros(global_batch_size, dtype=torch.long, device=device) if global_batch_size else None
        self.mean = torch.tensor(CIFAR_MEAN, device=device).view(1, 3, 1, 1) * 255.0
        self.inv_std = 1.0 / (torch.tensor(CIFAR_STD, device=device).view(1, 3, 1, 1) * 255.0)
        self.loss_sum = torch.zeros((), device=device)
        self.correct = torch.zeros((), dtype=torch.long, device=device)
        self.noise = torch.zeros(noise_rows, num_params, device=device) if noise_rows else None
        self.pgd_since = torch.zeros((), device=device)
        self.pgd_count = torch.zeros((), device=device)
        self.channels_last = channels_last

    def narrowed(self, rows: int) -> "_StepState":
        """The same state for a batch of ``rows`` images: own input buffers, shared
        accumulators, noise and constants (the short last batch of ``last_batch='short'``)."""
        other = copy.copy(self)
        other.x = torch.zeros(rows, *self.x.shape[1:], dtype=self.x.dtype, device=self.x.device)
        other.y = torch.zeros(rows, dtype=self.y.dtype, device=self.y.device)
        return other

    def model_input(self) -> torch.Tensor:
        """``(x/255 − mean)/std`` in float32 NCHW."""
        x = (self.x.float() - self.mean) * self.inv_std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def gradients_into(grads: list[torch.Tensor], loss: torch.Tensor, params: list[torch.Tensor], accumulate: bool = False) -> None:
    """Write (or add) ``∂loss/∂params`` into the persistent ``grads``.

    ``loss.backward()`` would add into each ``.grad`` with one kernel per
    tensor (and need them zeroed first); one multi-tensor copy instead cuts a
    step's kernel count by a quarter (ResNet-32: 95 tensors per backward), which
    is what a launch-bound GPU step pays for. Bit-identical to zero + backward.
    """
    new = torch.autograd.grad(loss, params, materialize_grads=True)
    with torch.no_grad():
        (torch._foreach_add_ if accumulate else torch._foreach_copy_)(grads, new)


def capture_step_graph(step: Callable[[], None], state: list[torch.Tensor], log: Callable[[str], None], owner: object) -> Any:
    """Capture ``step`` in a CUDA graph (``None`` when capture fails: train
    eagerly). The warm-up steps that capture needs are undone (``state``, every
    tensor the step changes, is restored), so training is unchanged. The
    capture stream is ``owner``'s alone (:data:`CAPTURE_STREAMS`), since runs
    on their own streams replay their graphs concurrently (:func:`fit_many`)."""
    saved = [t.detach().clone() for t in state]
    graph: Any = None
    try:
        graph, _, _ = capture_graph(step, warmup=3, stream=CAPTURE_STREAMS.lease(owner))
    except Exception as exc:  # capture is an optimisation: fall back to eager
        graph = None
        log(f"CUDA graph capture failed ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); training eagerly")
        torch.cuda.synchronize()
    with torch.no_grad():
        for t, v in zip(state, saved):
            t.copy_(v)
    return graph


class Trainer:
    """One training run writing into ``out_dir`` (see :func:`fit`)."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] | None = None) -> None:
        config.validate(new_run=not resume)  # a run made before a newer check must still resume (checked again if it starts over)
        self.out_dir = Path(out_dir)
        last = readable_last(self.out_dir) if resume else None  # read once: the format here, the state in _resume
        if resume and config.channels_last is None:
            config = replace(config, channels_last=stored_memory_format(last))
        if config.data_root is not None:  # checkpoints record it: analyses from any folder find the data
            config = replace(config, data_root=str(Path(config.data_root).expanduser().resolve()))
        self.config = config
        self.device = resolve_device(config.device)
        self.dist = self._join_process_group()
        say = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.log = say if self.dist.is_writer else (lambda msg: None)
        if not resume:
            check_out_dir_is_free(self.out_dir)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.channels_last = channels_last_for(config, self.device)
        self._load_data()
        self._build_model()
        self.start_epoch = 1
        self.best: dict[str, Any] | None = None
        self.metrics: dict[str, Any] = {}
        self._stored_spectra_every = 0  # the resumed run's own --spectra-every (_resume)
        if resume:
            self._resume(last)
        self.compile_mode = self._resolve_compile()
        self._forward_model: Callable[[torch.Tensor], torch.Tensor] = self.model
        if self.compile_mode in ("inductor", "max"):
            self._forward_model = torch.compile(self.model)
        self._graph: Any = None
        self._graph_failed = False
        self._short_state: _StepState | None = None  # last_batch="short": the last batch's input buffers

    # ------------------------------------------------------------ setup
    def _join_process_group(self) -> sd.DistContext:
        """This rank's place under ``torchrun`` (rank 0 of 1 otherwise); sets
        ``self.device`` to the rank's GPU (``cuda:LOCAL_RANK``) on CUDA."""
        if sd.launched_by_torchrun() or dist.is_available() and dist.is_initialized():
            ctx = sd.init_from_env(device=self.device)
            self.device = ctx.device
            self._check_split(ctx.world_size)
        else:
            ctx = sd.DistContext(device=self.device)
        if self.config.sync_bn and ctx.device.type != "cuda":
            raise ValueError("--sync-bn needs CUDA devices (PyTorch's SyncBatchNorm); train without it on CPUs")
        return ctx

    def _check_split(self, world_size: int) -> None:
        """Refuse what does not split over ``world_size`` ranks the way one process computes it."""
        c = self.config
        if c.batch_size % world_size:
            raise ValueError(f"the batch size {c.batch_size} (global) does not split evenly over {world_size} ranks")
        if world_size > 1 and c.last_batch == "short":
            raise ValueError("last_batch='short' is for one process (its last batch does not split over ranks); "
                             "use 'wrap' or 'drop' under torchrun")
        if world_size > 1 and c.optimizer == "lpf" and c.lpf_samples > 1:
            # each rank would split its own rows into M parts: other rows meet each noise draw, and the
            # class weights would normalise per part and rank — not the one-process step
            raise ValueError(f"LPF-SGD with lpf_samples={c.lpf_samples} is for one process: under torchrun its "
                             "batch parts would differ from the single-process ones; use lpf_samples=1 (the preset's)")

    def _load_data(self) -> None:
        c = self.config
        spec = DatasetSpec(c.dataset, c.data_root, "train", c.imbalance_ratio, c.imbalance_profile, c.data_seed, c.max_train_samples)
        self.train_set: LoadedDataset = load_dataset(spec, every_class=True)
        test_spec = DatasetSpec(c.dataset, c.data_root, "test", c.imbalance_ratio, c.imbalance_profile, c.data_seed, c.max_test_samples)
        test = load_dataset(test_spec)
        self.dataset_spec = spec
        # what the images are, not where: runs on two copies of a data set (one re-encoded) stay apart
        self.data_sha256 = {"train": self.train_set.content_sha256(), "test": test.content_sha256()}
        self.class_counts = self.train_set.class_counts
        self.num_classes = self.train_set.num_classes
        self.test_images = test.images.to(self.device)
        self.test_labels = test.labels.to(self.device)
        self.batches = EpochBatches(self.train_set.images, self.train_set.labels, c.batch_size, c.seed, self.device, c.last_batch)

    def _build_model(self) -> None:
        c = self.config
        self.arch_kwargs: dict[str, Any] = {"num_classes": self.num_classes}
        if c.arch in MODELS or c.cosine_head:
            self.arch_kwargs["cosine_head"] = bool(c.cosine_head)
        torch.manual_seed(c.seed)  # the same initial weights on every rank
        model = build_model(c.arch, **self.arch_kwargs)
        if c.sync_bn and self.dist.is_distributed:
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics of the global batch
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.model.train()
        self.loss_fn = build_loss(
            c.loss, self.class_counts, max_margin=c.ldam_max_margin, scale=c.ldam_scale, gamma=c.vs_gamma, tau=c.vs_tau
        ).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = TensorLRSGD(self.params, c.lr, c.momentum, c.weight_decay)
        self.bn_modules = [m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        num_params = sum(p.numel() for p in self.params)
        noise_rows = c.lpf_samples if c.optimizer == "lpf" else 1 if c.optimizer == "pgd" else 0
        world = self.dist.world_size
        self.rows = sd.local_batch_slice(c.batch_size, self.dist.rank, world)  # this rank's rows of a global batch
        self.state = _StepState(c.batch_size // world, self.device, num_params, noise_rows, self.channels_last,
                                c.batch_size if world > 1 else None)
        self.rho = torch.tensor(float(c.rho), device=self.device)
        self.drw_weights = effective_number_weights(self.class_counts, c.drw_beta).to(self.device)
        self._lpf_noise = LPFNoise(self.params) if c.optimizer == "lpf" else None
        self.autocast_dtype = torch.bfloat16 if c.amp == "bf16" else None

    def _resolve_compile(self) -> str:
        mode = self.config.compile
        if self.dist.is_distributed and self.dist.backend != "nccl" and mode in ("auto", "graphs", "max"):
            # The gradient all-reduce is part of the step; only NCCL collectives can be graph-captured.
            return "inductor" if mode == "max" else "off"
        if mode == "auto":
            return "graphs" if self.device.type == "cuda" else "off"
        if mode in ("graphs", "max") and self.device.type != "cuda":
            fallback = "inductor" if mode == "max" else "off"
            self.log(f"[{self.config.method}] --compile {mode}: CUDA graphs need a CUDA device; "
                     f"training {'with torch.compile only' if fallback == 'inductor' else 'eagerly'}")
            return fallback
        return mode

    # --------------------------------------------------------- the step
    def _loss_and_backward(self, x: torch.Tensor, y: torch.Tensor, scale: float | torch.Tensor = 1.0,
                           accumulate: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and logits of the batch; its gradient goes into the ``.grad`` tensors (added with ``accumulate``)."""
        # cache_enabled=False: autocast's weight-cast cache must not live across CUDA-graph replays.
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.bfloat16, enabled=self.autocast_dtype is not None, cache_enabled=False):
            logits = self._forward_model(x)
        loss = self.loss_fn(logits.float(), y)
        scaled = isinstance(scale, torch.Tensor) or scale != 1.0
        gradients_into(self._grads, loss * scale if scaled else loss, self.params, accumulate)
        return loss.detach(), logits.detach()

    def _rank_loss_scale(self) -> float | torch.Tensor:
        """Factor that turns this rank's weighted mean loss into its share of the global one.

        The loss of rank r is ``Σ_{i∈r} w_i ℓ_i / S_r`` with ``S_r = Σ_{i∈r} w_{y_i}``;
        times ``W · S_r / S`` (``S``: the weight sum of the global batch, known on
        every rank because every rank draws the whole global batch) and averaged
        over the W ranks, it is ``Σ_i w_i ℓ_i / S``, the single-process loss. With
        equal weights the factor is exactly 1.
        """
        if self.state.y_global is None:
            return 1.0
        w = self.loss_fn.weight
        return w[self.state.y].sum() / w[self.state.y_global].sum() * self.dist.world_size

    @contextlib.contextmanager
    def _bn_frozen(self, frozen: bool) -> Iterator[None]:
        """BatchNorm normalises with batch statistics but leaves running stats
        unchanged (momentum 0) — SAM's second pass with ``sam_bn='freeze'``."""
        if not frozen:
            yield
            return
        saved = [m.momentum for m in self.bn_modules]
        for m in self.bn_modules:
            m.momentum = 0.0
        try:
            yield
        finally:
            for m, mom in zip(self.bn_modules, saved):
                m.momentum = mom

    def _train_step(self, state: _StepState | None = None) -> None:
        """One update from the batch in ``state.x/y`` (default ``self.state``; graph-capturable)."""
        c, s = self.config, (state if state is not None else self.state)
        params, grads = self.params, self._grads
        x, y = s.model_input(), s.y
        share = self._rank_loss_scale()
        if c.optimizer == "lpf":
            # Gradient of the Gaussian-smoothed loss, as LPF-SGD's code: part m of the batch at w + ε_m,
            # weighted 1/M (a short last batch: parts of the full batch's part size, fewer of them).
            part = (c.batch_size // self.dist.world_size) // c.lpf_samples
            losses, parts = [], []
            for m, (xm, ym) in enumerate(zip(x.split(part), y.split(part))):
                eps = self._lpf_noise(s.noise[m], params, c.lpf_sigma)
                with torch.no_grad():
                    torch._foreach_add_(params, eps)
                loss_m, logits_m = self._loss_and_backward(xm, ym, scale=share / c.lpf_samples, accumulate=m > 0)
                with torch.no_grad():
                    torch._foreach_sub_(params, eps)
                losses.append(loss_m)
                parts.append(logits_m)
            loss, logits = torch.stack(losses).mean(), torch.cat(parts)
        else:
            loss, logits = self._loss_and_backward(x, y, scale=share)
        sd.average_gradients(params)  # no-op in one process; SAM's g/||g|| needs the global g
        if c.optimizer == "sam":
            e = sam_perturbation(params, grads, self.rho, c.sam_adaptive)
            with torch.no_grad():
                torch._foreach_add_(params, e)
            with self._bn_frozen(c.sam_bn == "freeze"):
                self._loss_and_backward(x, y, scale=share)
            sd.average_gradients(params)
            with torch.no_grad():
                torch._foreach_sub_(params, e)
        if c.optimizer == "pgd":
            eligible = (s.pgd_since >= c.pgd_interval).float()
            if c.pgd_grad_threshold is not None:
                eligible = eligible * (global_grad_norm(grads) <= c.pgd_grad_threshold).float()
        self.optimizer.step()
        with torch.no_grad():
            if c.optimizer == "pgd":
                xi = pgd_perturbation(s.noise[0], c.pgd_radius, eligible)
                torch._foreach_add_(params, split_like(xi, params))
                s.pgd_since.copy_(torch.where(eligible > 0, 0.0, s.pgd_since) + 1.0)
                s.pgd_count.add_(eligible)
            s.loss_sum.add_(loss * share)  # summed over ranks: W × the global-batch loss
            s.correct.add_((logits.argmax(1) == y).sum())

    def _run_step(self) -> None:
        if self.compile_mode in ("graphs", "max") and not self._graph_failed:
            if self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                return
        self._train_step()

    def _snapshot(self) -> list[torch.Tensor]:
        tensors = [*self.params, *self.model.buffers(), *self.loss_fn.buffers()]
        tensors += [self.optimizer.state[p]["momentum_buffer"] for p in self.params]
        tensors += [self.state.loss_sum, self.state.correct, self.state.pgd_since, self.state.pgd_count]
        return tensors

    def _capture(self) -> None:
        self._graph = capture_step_graph(self._train_step, self._snapshot(), self.log, owner=self)
        self._graph_failed = self._graph is None

    # -------------------------------------------------------- an epoch
    def _begin_epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        lr = learning_rate(epoch, c.lr, c.warmup_epochs, c.resolved_lr_milestones(), c.lr_factors)
        self.optimizer.set_lr(lr)
        self.current_lr = lr
        on = c.drw and drw_active(epoch, c.resolved_drw_epoch())
        self.loss_fn.weight.copy_(self.drw_weights if on else torch.ones_like(self.drw_weights))
        self.state.loss_sum.zero_()
        self.state.correct.zero_()
        return self.batches.epoch(epoch)

    def _noise_for_epoch(self, epoch: int) -> torch.Generator | None:
        """PGD / LPF noise generator of ``epoch``, on the training device (the
        noise is 0.5-4 M numbers per step: drawing it on the host would dominate
        a GPU step). CPU runs are bit-reproducible; CUDA runs are reproducible
        on the same device and software."""
        if self.state.noise is None:
            return None
        seed = int(epoch_generator(self.config.seed, epoch, _NOISE_STREAM).initial_seed())
        return torch.Generator(device=self.device).manual_seed(seed)

    def prepare(self) -> None:
        """Create the persistent gradient tensors (accumulated in place by every step)."""
        self._grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._grads.append(p.grad)

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> dict[str, float]:
        """Run the steps of 1-indexed ``epoch`` (the first ``max_steps`` only, for
        benchmarks); returns train loss/accuracy and timing."""
        steps = self.start_train_epoch(epoch, max_steps)
        for i in range(steps):
            self.train_step(i)
        return self.finish_train_epoch()

    def start_train_epoch(self, epoch: int, max_steps: int | None = None) -> int:
        """Set the epoch's learning rate, class weights and batches; returns its step count."""
        self._t_epoch = time.perf_counter()
        self._xs, self._ys = self._begin_epoch(epoch)
        self._gen = self._noise_for_epoch(epoch)
        self._steps = self.batches.steps if max_steps is None else min(max_steps, self.batches.steps)
        self._images = sum(self.batches.batch_size_of(i) for i in range(self._steps))
        return self._steps

    def train_step(self, i: int) -> None:
        """Step ``i`` of the current epoch (no host synchronisation)."""
        rows = self.batches.batch_size_of(i)
        short = rows < self.config.batch_size  # last_batch="short": the reference's last batch
        if short and self._short_state is None:
            self._short_state = self.state.narrowed(rows)
        s = self._short_state if short else self.state
        s.x.copy_(self._xs[i][:rows] if short else self._xs[i][self.rows])
        s.y.copy_(self._ys[i][:rows] if short else self._ys[i][self.rows])
        if s.y_global is not None:
            s.y_global.copy_(self._ys[i])
        if self._gen is not None:
            s.noise.normal_(generator=self._gen)
        if short:
            self._train_step(s)  # once per epoch, eagerly: the captured graph has the full batch's shape
        else:
            self._run_step()

    def finish_train_epoch(self) -> dict[str, float]:
        s, steps = self.state, self._steps
        # Σ ||w|| is finite iff every weight is: read with the epoch's totals (no extra host sync).
        weight_norms = torch.stack(torch._foreach_norm(self.params)).sum().double()
        totals = torch.stack([s.loss_sum.double(), s.correct.double(), weight_norms])
        if self.dist.is_distributed:
            dist.all_reduce(totals)  # Σ over ranks (on the GPU with NCCL, the CPU with gloo)
        loss_sum, correct, weight_norm = totals.tolist()  # synchronises once per epoch
        self._weights_finite = math.isfinite(weight_norm)
        loss = loss_sum / (steps * self.dist.world_size)
        acc = 100.0 * correct / self._images
        seconds = time.perf_counter() - self._t_epoch
        self._xs = self._ys = None
        return {
            "train_loss": loss,
            "train_acc": acc,
            "lr": self.current_lr,
            "epoch_time_s": seconds,
            "images_per_s": self._images / seconds,
        }

    def evaluate(self) -> dict[str, Any]:
        c = self.config
        return evaluate(
            self.model, self.test_images, self.test_labels, self.class_counts, c.eval_batch_size, c.tail_fraction, self.autocast_dtype, self.channels_last
        )

    # -------------------------------------------------- files and resume
    def _checkpoint(self, epoch: int) -> dict[str, Any]:
        # copy=True: a tensor may be a view into a larger storage (spectra.train.ensemble),
        # and torch.save of a view would write that whole storage.
        cpu = lambda sd: {k: (v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}  # noqa: E731
        opt = self.optimizer.state_dict()
        opt["state"] = {k: cpu(v) for k, v in opt["state"].items()}
        opt["param_groups"] = [cpu(g) for g in opt["param_groups"]]
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "arch": self.config.arch,
            "arch_kwargs": dict(self.arch_kwargs),
            "num_classes": self.num_classes,
            "class_names": list(self.train_set.class_names),
            "dataset": self.dataset_spec.to_dict(),
            "data_sha256": dict(self.data_sha256),
            "class_counts": list(self.class_counts),
            "method": self.config.method,
            "config": self.config.to_dict(),
            "epoch": epoch,
            "state_dict": cpu(self.model.state_dict()),
            "optimizer": opt,
            "rng": {"seed": self.config.seed, "scheme": "generators seeded with (seed, epoch)", "torch_cpu": torch.get_rng_state()},
            "train_state": {"pgd_since": self.state.pgd_since.cpu(), "pgd_count": self.state.pgd_count.cpu()},
            "metrics": self.metrics,
            "best": self.best,
            "spectra_version": _spectra_version(),
        }

    def _resume(self, ckpt: dict[str, Any] | None) -> None:
        """Continue after the epoch of ``last.pt`` (``ckpt``: it, already loaded). Without ``last.pt``, start
        from scratch only when the folder holds no run (at most the log lines of an
        attempt killed before its first checkpoint); checkpoints or a summary
        without ``last.pt`` are refused, since starting over would overwrite them."""
        path = self.out_dir / "last.pt"
        if not path.is_file():
            found = [name for name in existing_run_files(self.out_dir) if name not in PRE_CHECKPOINT_FILES]
            if found:
                raise ValueError(f"--resume: {self.out_dir} holds run files ({listed(found)}) but no last.pt to resume from; "
                                 "restore last.pt (or copy the newest ckpt_epochNNNN.pt to it) or choose another --out")
            self.config.validate()  # a new run after all: every check applies
            self.log(f"--resume: no {path}; starting from scratch")
            self._truncate_logs(0)  # lines of an attempt killed before its first checkpoint
            return
        if ckpt is None:  # unreadable: loading it again raises its one-line error
            ckpt = load_training_checkpoint(path, map_location="cpu")
        missing = [key for key in ("config", "epoch", "state_dict", "optimizer", "rng", "train_state") if key not in ckpt]
        if missing:
            raise ValueError(f"--resume: {path} has no {', '.join(missing)}; only a checkpoint with optimizer state "
                             "(last.pt, or a ckpt_epochNNNN.pt saved with snapshot_optimizer=true) resumes a run")
        saved = dict(ckpt["config"])
        self._stored_spectra_every = int(saved.get("spectra_every") or 0)
        mine = self.config.to_dict()
        # Run-control settings may change on resume; the recipe may not, nor the test subset (max_test_samples:
        # the accuracies of one metrics log must stay comparable).
        free = {"device", "compile", "channels_last", "progress", "time_limit_s", "data_root", "eval_every", "eval_batch_size", "save_every", "snapshot_optimizer",
                "spectra_every", "spectra_samples_per_class", "spectra_batch_size", "spectra_max_iter"}
        changed = sorted(k for k in mine if k not in free and saved.get(k) != mine[k])
        if changed:
            raise ValueError(f"--resume: settings differ from the run in {self.out_dir}: {', '.join(changed)}")
        stored_data = ckpt.get("data_sha256")  # absent in checkpoints that predate it
        if stored_data is not None and stored_data != self.data_sha256:
            raise ValueError(f"--resume: the images under {self.config.data_root} are not those the run in {self.out_dir} "
                             "was trained and tested on (their SHA-256 differs); resume with the run's copy of the data")
        self.model.load_state_dict(ckpt["state_dict"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for p in self.params:  # the base class may re-create state tensors on load
            buf = self.optimizer.state[p]["momentum_buffer"]
            self.optimizer.state[p]["momentum_buffer"] = torch.empty_like(p).copy_(buf)  # p's device and memory format
        self.state.pgd_since.copy_(ckpt["train_state"]["pgd_since"])
        self.state.pgd_count.copy_(ckpt["train_state"]["pgd_count"])
        torch.set_rng_state(ckpt["rng"]["torch_cpu"])
        self.start_epoch = int(ckpt["epoch"]) + 1
        self.metrics = ckpt.get("metrics") or {}
        self.best = ckpt.get("best")
        self._truncate_logs(int(ckpt["epoch"]))
        self.log(f"resumed {self.out_dir} at epoch {ckpt['epoch']}")

    def _truncate_logs(self, epoch: int) -> None:
        if self.dist.is_writer:
            truncate_logs(self.out_dir, epoch)

    def _append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        if not self.dist.is_writer:
            return
        with open(self.out_dir / name, "a") as fh:
            fh.write(json.dumps(record) + "\n")

    # ------------------------------------------------------------ driver
    def fit(self) -> FitResult:
        """Train from ``start_epoch`` to ``config.epochs`` (or the time limit)."""
        self.begin()
        while not self.done:
            stats = self.train_epoch(self.epoch)
            self.end_epoch(stats)
        return self.finish()

    def begin(self) -> None:
        """Write ``config.json``, create gradients and the optional spectra probe."""
        c = self.config
        self.already_complete = self.start_epoch > c.epochs  # resumed a finished run: keep its files as they are
        if self.dist.is_writer and not self.already_complete:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out_dir / "config.json", c.to_dict())
        self.prepare()
        self._probe = None
        # A finished run stays as it is; one whose summary is missing was cut short after its last
        # epoch (maybe inside that epoch's probe), which the probe below may still have to complete.
        if c.spectra_every and not (self.already_complete and self._stored_summary() is not None):
            from .spectra_probe import RESULTS_FILE, PerClassSpectra

            self._probe = PerClassSpectra(self.out_dir / RESULTS_FILE, self.device, c.data_root, c.spectra_samples_per_class,
                                          c.spectra_batch_size, max_iter=c.spectra_max_iter)
            self._probe.check_results_file()  # a foreign or locked results.h5 fails now, not after an epoch
        self._bar = None
        self._complete_cut_probe()
        self._t_start = time.perf_counter()
        self._train_seconds, self._train_epochs = 0.0, 0
        self._stopped_early = False
        self._weights_finite = True  # of the last epoch trained (finish_train_epoch)
        self.epoch = self.start_epoch
        self.done = self.epoch > c.epochs
        self._bar = None if self.done else self._progress_bar()

    def end_epoch(self, stats: dict[str, float], over_time: bool | None = None) -> None:
        """Evaluate, log, checkpoint after ``self.epoch``; advance or finish.
        ``over_time`` overrides this run's own time-limit check (runs that must stop together)."""
        c, epoch = self.config, self.epoch
        self._check_finite(stats)
        if epoch > self.start_epoch or epoch == c.epochs:  # the first epoch includes capture/compile
            self._train_seconds += stats["epoch_time_s"]
            self._train_epochs += 1
        record: dict[str, Any] = {"epoch": epoch, **stats}
        final = epoch == c.epochs
        if over_time is None:
            over_time = c.time_limit_s is not None and time.perf_counter() - self._t_start > c.time_limit_s
        over_time = sd.any_rank(over_time)  # the ranks' clocks differ; all must stop after the same epoch
        sd.average_buffers(self.model)  # one model on every rank (BN running statistics drift apart)
        if self.dist.is_writer and (epoch % c.eval_every == 0 or final or over_time):
            test = self.evaluate()
            record.update(test)
            self.metrics = record
            if self.best is None or test["acc"] > self.best["acc"]:
                self.best = {"epoch": epoch, "acc": test["acc"], "tail_acc": test["tail_acc"]}
            self._append_jsonl("metrics.jsonl", record)
        probe = self._is_probe_epoch(epoch)
        # An epoch the probe analyses keeps its checkpoint: the results entries name that file.
        keep = epoch == 1 or epoch % c.save_every == 0 or final or over_time or probe
        if self.dist.is_writer:
            ckpt = self._checkpoint(epoch)
            if keep:
                # Snapshots serve analysis; only last.pt must resume, so the momentum buffers may stay out.
                snapshot = ckpt if c.snapshot_optimizer else {k: v for k, v in ckpt.items() if k != "optimizer"}
                atomic_torch_save(self.out_dir / checkpoint_name(epoch), snapshot)
            atomic_torch_save(self.out_dir / "last.pt", ckpt)
        if probe:  # after last.pt: a kill in here is completed on resume (_complete_cut_probe)
            self._run_probe(epoch)
        if self.dist.is_writer:
            self._report(self._bar, record)
        self.epoch += 1
        if over_time and not final:
            self._stopped_early = True
            self.log(f"[{c.method}] time limit {c.time_limit_s:g} s reached after epoch {epoch}; stopping")
        self.done = final or over_time

    def _is_probe_epoch(self, epoch: int) -> bool:
        """The spectra probe analyses the checkpoint of ``epoch`` (every ``spectra_every``-th and the first)."""
        return self._probe is not None and (epoch % self.config.spectra_every == 0 or epoch == 1)

    def _run_probe(self, epoch: int) -> None:
        """Per-class spectra of the checkpoint of ``epoch`` into results.h5, then its spectra.jsonl line."""
        records = self._probe(self._saved_checkpoint(epoch), on_class=self._probe_progress(epoch))
        self._append_jsonl("spectra.jsonl", {"epoch": epoch, **self._probe.summary(records)})

    def _complete_cut_probe(self) -> None:
        """Redo the probe of the epoch resumed from when it did not finish.

        ``last.pt`` is saved before the probe runs, so a kill inside the probe
        leaves that epoch's checkpoint file but no spectra.jsonl line. The
        in-memory model is that checkpoint's, and the probe comes at the same
        point of the run as without the kill. Classes it stored already are
        read back from results.h5 (keyed by checkpoint, class and settings),
        not analysed again.
        """
        epoch = self.start_epoch - 1
        if epoch < 1 or not self._is_probe_epoch(epoch):
            return
        cut = None
        if self.dist.is_writer:
            cut = (self.out_dir / checkpoint_name(epoch)).is_file() and epoch not in logged_epochs(self.out_dir, "spectra.jsonl")
        if not sd.broadcast_from_writer(cut):
            return
        every = self._stored_spectra_every
        if every and (epoch % every == 0 or epoch == 1):
            self.log(f"[{self.config.method}] the spectra probe of epoch {epoch} did not finish (no line in spectra.jsonl); "
                     "running it again")
        else:  # the run was made without this probe epoch (--spectra-every new or changed on resume)
            self.log(f"[{self.config.method}] running the spectra probe of epoch {epoch}, the epoch resumed from")
        self._run_probe(epoch)

    def _check_finite(self, stats: dict[str, float]) -> None:
        """Stop with :class:`TrainingDiverged` when the epoch's loss or weights are
        NaN/inf, before anything of that epoch is written (the checkpoints of the
        earlier epochs and ``last.pt`` stay as they are)."""
        loss = stats["train_loss"]
        if math.isfinite(loss) and self._weights_finite:
            return
        if self._bar is not None:
            self._bar.close()
        what = f"the training loss became {loss}" if not math.isfinite(loss) else "the weights became NaN or infinite"
        kept = (f"last.pt (epoch {self.epoch - 1}) and the earlier checkpoints kept in {self.out_dir}" if self.epoch > 1
                else "no checkpoint written")
        raise TrainingDiverged(f"[{self.config.method}] {what} in epoch {self.epoch} (lr {self.current_lr:g}); "
                               f"training stopped, {kept}; {self._divergence_advice()}")

    def _divergence_advice(self) -> str:
        """What to try after a divergence: the lr, and the noise scale of a perturbing optimizer."""
        c = self.config
        if c.optimizer == "pgd":
            return f"try a smaller --lr or pgd_radius (now {c.pgd_radius:g}; --set pgd_radius=...)"
        if c.optimizer == "lpf":
            return f"try a smaller --lr or lpf_sigma (now {c.lpf_sigma:g}; --set lpf_sigma=...)"
        return "try a smaller --lr"

    def _probe_progress(self, epoch: int) -> Callable[[Any], None]:
        """Per-class progress of the spectra probe: the bar's postfix, or one log line per class."""
        bar = self._bar

        def show(event: Any) -> None:
            where = f"class {event.class_index + 1}/{event.num_classes} ({event.class_name})"
            if bar is not None:
                if event.status == "start":
                    bar.set_postfix_str(f"epoch {epoch} spectra: {where}", refresh=True)
                return
            if event.status == "done":
                top, bottom = event.record.arrays["top"][0], event.record.arrays["bottom"][0]
                self.log(f"[{self.config.method}] epoch {epoch} spectra {where}: λmax {top:.4g} λmin {bottom:.4g}")
            elif event.status == "skipped":
                self.log(f"[{self.config.method}] epoch {epoch} spectra {where}: skipped ({event.reason})")

        return show

    def _saved_checkpoint(self, epoch: int) -> Any:
        """The in-memory model as the checkpoint file of ``epoch`` just written
        (its SHA-256 comes from rank 0, which wrote it)."""
        from ..checkpoints import LoadedCheckpoint, file_sha256

        path = self.out_dir / checkpoint_name(epoch)
        sha = sd.broadcast_from_writer(file_sha256(path) if self.dist.is_writer else None)
        return LoadedCheckpoint(
            model=self.model, path=path, sha256=sha, epoch=epoch, format="spectra", arch=self.config.arch,
            arch_kwargs=dict(self.arch_kwargs), num_classes=self.num_classes,
            class_names=list(self.train_set.class_names), class_counts=list(self.class_counts),
            dataset=self.dataset_spec.to_dict(), method=self.config.method,
        )

    def finish(self) -> FitResult:
        """Write ``summary.json`` (rank 0)."""
        if self._bar is not None:
            self._bar.close()
        if self.already_complete:
            stored = self._stored_summary()
            if stored is not None:
                return FitResult(self.out_dir, stored, self.model, already_complete=True)
        summary = self._summary()
        if self.dist.is_writer:
            atomic_write_json(self.out_dir / "summary.json", summary)
        return FitResult(self.out_dir, summary, self.model, already_complete=self.already_complete)

    def _stored_summary(self) -> dict[str, Any] | None:
        """``summary.json`` of a finished run (None when missing or unreadable: then it is rewritten)."""
        try:
            summary = json.loads((self.out_dir / "summary.json").read_text())
        except (OSError, ValueError):
            return None
        return summary if isinstance(summary, dict) and summary.get("epochs_completed") == self.config.epochs else None

    def _progress_bar(self) -> Any:
        if not self.config.progress or not self.dist.is_writer:
            return None
        from tqdm.auto import tqdm

        return tqdm(total=self.config.epochs, initial=self.start_epoch - 1, unit="ep", desc=self.config.method, dynamic_ncols=True, file=sys.stderr)

    def _report(self, bar: Any, r: dict[str, Any]) -> None:
        fields = {"loss": f"{r['train_loss']:.3f}", "train": f"{r['train_acc']:.1f}%", "img/s": f"{r['images_per_s']:.0f}"}
        if "acc" in r:
            fields["test"] = f"{r['acc']:.2f}%"
            if r.get("tail_acc") is not None:
                fields["tail"] = f"{r['tail_acc']:.1f}%"
        if bar is not None:
            bar.set_postfix(fields, refresh=False)
            bar.update(1)
        else:
            self.log(f"[{self.config.method}] epoch {r['epoch']}/{self.config.epochs} " + " ".join(f"{k} {v}" for k, v in fields.items()))

    def _summary(self) -> dict[str, Any]:
        """The run's summary.json, as of now (after :meth:`train`)."""
        c = self.config
        per_epoch = self._train_seconds / self._train_epochs if self._train_epochs else None
        return {
            "method": c.method,
            "dataset": c.dataset,
            "epochs_completed": self.epoch - 1,
            "epochs_planned": c.epochs,
            "stopped_early": self._stopped_early,
            "final": self.metrics,
            "best": self.best,
            "tail_classes": tail_classes(self.class_counts, c.tail_fraction),
            "class_counts": list(self.class_counts),
            "train_images": len(self.train_set),
            "train_data_sha256": self.data_sha256["train"],
            "test_data_sha256": self.data_sha256["test"],
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "cpu_threads": torch.get_num_threads() if self.device.type == "cpu" else None,  # s/epoch depends on it
            "compile_mode": "off (graph capture failed)" if self._graph_failed else self.compile_mode,
            "amp": c.amp,
            "world_size": self.dist.world_size,
            "backend": self.dist.backend,
            # Timing covers this process only: a resumed run (maybe on another device) reports its last leg.
            "resumed_after_epoch": self.start_epoch - 1,
            "timed_epochs": self._train_epochs,
            "wall_time_s": time.perf_counter() - self._t_start,
            "seconds_per_epoch": per_epoch,
            "images_per_s": (self.batches.images_per_epoch / per_epoch) if per_epoch else None,
            "pgd_perturbations": float(self.state.pgd_count) if c.optimizer == "pgd" else None,
        }


def fit(config: TrainConfig, out_dir: str | Path, resume: bool = False, log: Callable[[str], None] | None = None) -> FitResult:
    """Train per ``config``, writing checkpoints, ``metrics.jsonl``, ``summary.json``
    and ``config.json`` into ``out_dir``; returns the summary and the model.

    >>> from spectra.train import resolve_config, fit          # doctest: +SKIP
    >>> fit(resolve_config("ce-drw-sam", data_root="data"), "runs/cedrwsam")  # doctest: +SKIP
    """
    return Trainer(config, out_dir, resume=resume, log=log).fit()
