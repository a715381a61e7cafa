"""Running spectra on ``torch.distributed``: one process per rank, as ``torchrun`` starts them.

Two ways to use several ranks, both built from the functions here:

- **One Hessian, sharded samples.** Every rank holds a disjoint contiguous
  block of the class's N samples (:func:`shard`). :class:`~spectra.HessianOperator`
  detects the process group and all-reduces its float64 partial sums
  ``Σ_{i ∈ shard_r} n_b · (H_b v)``, then divides by the global N, so each
  rank gets the full ``H v = (1/N) Σ_r Σ_{i ∈ shard_r} ∇²ℓ_i v``. Probes and
  start vectors come from seeded CPU generators and an all-reduce hands every
  rank the same bits, so every rank runs the same Lanczos recurrence and ends
  with the same eigenvalues; only the writer (rank 0) prints and stores.
- **Many jobs, one per rank at a time.** (checkpoint, class) jobs are dealt
  round-robin over ranks (:func:`split_jobs`); each rank computes its own
  Hessian with ``HessianOperator(..., distributed=False)`` and the records
  travel to rank 0 (:func:`gather_to_writer`), which writes them, one round
  at a time. A rank that dies loses only its round; the rerun skips what was
  stored.

Data-parallel training: :func:`average_gradients` (or :func:`wrap_ddp`) makes
the update of a global batch split over ranks equal to the single-process one.

Outside ``torchrun`` (no ``RANK``/``WORLD_SIZE`` in the environment and no
group initialised) every function here is a cheap single-process no-op.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import sys
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.utils.data import Dataset, Subset

from .data import DataLike, is_tensor_pair, iter_batches

T = TypeVar("T")
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job.

    ``rank``/``world_size``: global rank and number of ranks; ``local_rank``:
    rank on this node (selects the GPU); ``device``: this rank's compute
    device; ``backend``: ``"nccl"``, ``"gloo"`` or ``None`` (single process);
    ``owns_group``: this context initialised the process group (and
    :func:`distributed_session` destroys it at exit).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: Optional[str] = None
    owns_group: bool = False

    @property
    def is_writer(self) -> bool:
        """Rank 0 alone prints and writes results."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """More than one rank takes part."""
        return self.world_size > 1


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def launched_by_torchrun() -> bool:
    """True when the environment carries the variables ``torchrun`` sets for each rank."""
    return all(v in os.environ for v in ("RANK", "WORLD_SIZE"))


def _resolve_device(device: Union[None, str, torch.device], local_rank: int) -> torch.device:
    """``cuda:LOCAL_RANK`` for a CUDA device (or None with CUDA present), else the CPU.

    An unknown device name is a one-line ``ValueError`` (not torch's list of every device type)."""
    try:
        wanted = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise ValueError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N or auto") from None
    if wanted.type != "cuda":
        return wanted
    if not torch.cuda.is_available():
        raise RuntimeError(f"device {str(wanted)!r} requested but CUDA is not available")
    count = torch.cuda.device_count()
    index = wanted.index if wanted.index is not None else local_rank
    if index >= count:
        raise RuntimeError(f"LOCAL_RANK {local_rank} needs GPU {index}, but this node has {count}; "
                           f"start at most {count} processes per node (--nproc_per_node)")
    return torch.device("cuda", index)


def init_from_env(backend: Optional[str] = None, device: Union[None, str, torch.device] = None,
                  timeout_s: float = 1800.0) -> DistContext:
    """Join the job ``torchrun`` started, or describe the single process.

    - A process group is already initialised (the user did it): report it.
    - ``RANK``/``WORLD_SIZE`` are set (``torchrun``): pick this rank's device
      (``cuda:LOCAL_RANK`` when ``device`` is CUDA, or None and CUDA is
      present; else the CPU), make it the current CUDA device, and initialise
      the default group with ``backend`` (default ``"nccl"`` on a CUDA device,
      ``"gloo"`` on the CPU) from ``MASTER_ADDR``/``MASTER_PORT``.
    - Otherwise: rank 0 of 1 on ``device`` (nothing initialised).
    """
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if _group_ready():
        rank, world = dist.get_rank(), dist.get_world_size()
        return DistContext(rank, world, local_rank, _resolve_device(device, local_rank), dist.get_backend())
    if not launched_by_torchrun():
        return DistContext(device=_resolve_device(device, 0))
    missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(f"RANK and WORLD_SIZE are set but not {', '.join(missing)}; start with torchrun")
    chosen = _resolve_device(device, local_rank)
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)  # before init: NCCL binds each rank to its current device
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, backend, owns_group=True)


@contextlib.contextmanager
def distributed_session(backend: Optional[str] = None, device: Union[None, str, torch.device] = None,
                        timeout_s: float = 1800.0) -> Iterator[DistContext]:
    """:func:`init_from_env` for a ``with`` block; destroys the group it created at exit."""
    ctx = init_from_env(backend, device, timeout_s)
    try:
        yield ctx
        # every rank reaches the teardown before any destroys the group: a gloo rank
        # that exits while a peer is still communicating aborts ("terminate called ...")
        if ctx.owns_group and _group_ready() and dist.get_world_size() > 1:
            dist.barrier()
    finally:
        if ctx.owns_group and _group_ready():
            dist.destroy_process_group()


def current_rank() -> int:
    return dist.get_rank() if _group_ready() else 0


def current_world_size() -> int:
    return dist.get_world_size() if _group_ready() else 1


def is_writer() -> bool:
    """True on rank 0 (and in a single process): the one rank that prints and writes."""
    return current_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if _group_ready() and dist.get_world_size() > 1:
        dist.barrier()


def rank_zero_print(*args: Any, file: Any = None, **kwargs: Any) -> None:
    """``print`` on the writer rank only (stderr by default, flushed)."""
    if is_writer():
        print(*args, file=file or sys.stderr, flush=True, **kwargs)


# ------------------------------------------------------------------- sharding
def shard_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """``[start, stop)`` of rank ``rank``'s block of ``n`` samples.

    Contiguous blocks in rank order: the first ``n mod world`` ranks get
    ``⌈n/world⌉`` samples, the others ``⌊n/world⌋`` (possibly 0). The blocks
    are disjoint and cover ``0..n-1`` exactly once — no padding, no dropping,
    unlike ``DistributedSampler``, which repeats samples to even the shards
    out and would change the Hessian.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    if n < 0:
        raise ValueError("n must be non-negative")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard_indices(n: int, rank: int, world: int) -> range:
    """The sample indices of rank ``rank`` (see :func:`shard_range`)."""
    return range(*shard_range(n, rank, world))


def shard(data: DataLike, rank: Optional[int] = None, world: Optional[int] = None) -> Any:
    """This rank's block of a class's samples (default: the current group's rank).

    - ``(inputs, targets)`` tensors -> the sliced tensor pair (views);
    - a map-style ``Dataset`` -> a ``Subset`` of it;
    - any other iterable of ``(inputs, targets)`` batches -> the batches are
      concatenated and sliced into one ``(inputs, targets)`` pair (load the
      class first; for data that does not fit, shard a ``Dataset`` instead).

    A rank may receive zero samples (fewer samples than ranks); the operator
    still counts the global N by an all-reduce.
    """
    rank = current_rank() if rank is None else rank
    world = current_world_size() if world is None else world
    if is_tensor_pair(data):
        x, y = data
        start, stop = shard_range(len(y), rank, world)
        return x[start:stop], y[start:stop]
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return Subset(data, list(shard_indices(len(data), rank, world)))
    batches = list(iter_batches(data))
    if not batches:
        raise ValueError("cannot shard empty data")
    return shard((torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])), rank, world)


# ----------------------------------------------------------- spreading jobs
def split_jobs(jobs: Sequence[T], rank: Optional[int] = None, world: Optional[int] = None) -> list[T]:
    """Rank ``rank``'s jobs, dealt round-robin: ``jobs[rank], jobs[rank + world], …``.

    Round-robin (not blocks) so that round ``j`` — every rank's ``j``-th job —
    covers ``jobs[j·world : (j+1)·world]``: the writer stores the list in order,
    and a sweep cut short has done a prefix of it.
    """
    rank = current_rank() if rank is None else rank
    world = current_world_size() if world is None else world
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in 0..{world - 1}")
    return list(jobs[rank::world])


def num_rounds(num_jobs: int, world: Optional[int] = None) -> int:
    """Rounds needed to run ``num_jobs`` jobs on ``world`` ranks (every rank joins every round)."""
    world = current_world_size() if world is None else world
    return -(-num_jobs // world)


def gather_to_writer(obj: Any) -> Optional[list[Any]]:
    """Collect one picklable object from every rank on rank 0.

    Returns ``[obj_rank0, obj_rank1, …]`` on rank 0 and ``None`` elsewhere; in
    a single process ``[obj]``. Collective: every rank must call it, the same
    number of times (send ``None`` from a rank that has nothing this round).
    """
    if not (_group_ready() and dist.get_world_size() > 1):
        return [obj]
    out: Optional[list[Any]] = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (a MAX all-reduce).

    A job's outcome must be agreed before ranks take different branches, or
    the ranks that go on wait forever in the next collective.
    """
    if not (_group_ready() and dist.get_world_size() > 1):
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([int(bool(flag))], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_from_writer(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (e.g. the list of jobs not yet stored,
    read from the results file by the writer alone). Collective."""
    if not (_group_ready() and dist.get_world_size() > 1):
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# ------------------------------------------------------- data-parallel training
def _flat_all_reduce_mean(tensors: list[Tensor]) -> None:
    """Replace each tensor by its mean over ranks, with one all-reduce per dtype."""
    world = dist.get_world_size()
    by_dtype: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in group])
        dist.all_reduce(flat)
        flat.div_(world)
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def average_gradients(params: Sequence[Tensor]) -> None:
    """``p.grad ← (1/W) Σ_r p.grad_r`` for every parameter with a gradient (in place).

    With each rank holding an equal share ``B/W`` of a global batch and a loss
    that is the mean over its local share, the average of the local gradients
    is the gradient of the mean loss over the global batch — the same update
    as one process with batch ``B``. Call after every ``backward`` whose
    gradient feeds a step or a SAM perturbation (SAM's ``g/‖g‖`` needs the
    global g). No-op in a single process.
    """
    if not (_group_ready() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        _flat_all_reduce_mean(grads)


def average_buffers(module: nn.Module) -> None:
    """Average the floating buffers (BatchNorm running mean/var) over ranks.

    Without SyncBN each rank's running statistics follow its own share of the
    batches; averaging them (e.g. before evaluating or checkpointing) gives
    every rank the same model. The mean of per-rank running variances is not
    the variance of the union; SyncBN is the exact alternative on GPUs.
    """
    if not (_group_ready() and dist.get_world_size() > 1):
        return
    buffers = [b for b in module.buffers() if b.is_floating_point()]
    if buffers:
        _flat_all_reduce_mean(buffers)


def broadcast_parameters(module: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank (same start everywhere)."""
    if not (_group_ready() and dist.get_world_size() > 1):
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def local_batch_slice(global_batch: int, rank: Optional[int] = None, world: Optional[int] = None) -> slice:
    """Rows of a global batch that this rank trains on.

    Every rank draws the same global batch from the same seeded generator and
    keeps its block; equal shares are required for :func:`average_gradients`
    to equal the global-batch gradient, so ``global_batch`` must divide by W.
    """
    rank = current_rank() if rank is None else rank
    world = current_world_size() if world is None else world
    if global_batch % world:
        raise ValueError(f"the global batch {global_batch} does not split evenly over {world} ranks")
    start, stop = shard_range(global_batch, rank, world)
    return slice(start, stop)


def wrap_ddp(model: nn.Module, ctx: DistContext, sync_batchnorm: bool = False) -> nn.Module:
    """``DistributedDataParallel(model)`` on this rank's device (the model unchanged in a single process).

    ``sync_batchnorm``: convert BatchNorm to ``SyncBatchNorm`` first, so batch
    statistics are those of the global batch (CUDA only in PyTorch).
    """
    if not ctx.is_distributed:
        return model
    if sync_batchnorm:
        if ctx.device.type != "cuda":
            raise ValueError("SyncBatchNorm needs CUDA devices in PyTorch; train without it on CPUs")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ctx.device)
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
