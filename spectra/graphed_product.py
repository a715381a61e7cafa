"""Replay of a batched Hessian-vector product as a CUDA graph, one per static shape.

An eager ``vmap(jvp(grad))`` product over a ResNet launches thousands of small
kernels through several ``torch.func`` dispatch layers; on a GPU its time is
that overhead, not arithmetic (docs/performance.md: one product costs the same
for 53 or 512 images). Capturing the product once per input shape and
replaying it removes the overhead without compiling anything.

:class:`GraphedProduct` wraps ``fn(tangents, x, y, real) -> (k, d)`` (the
parameters are closed over and never change). For each input signature
(rows, k, dtypes) it keeps static input buffers and, on CUDA, a captured
graph: a call copies its inputs into the buffers and replays. The first call
of a signature warms up on a side stream (cuDNN picks its algorithms there),
captures, replays once and compares the replay with the eager result; any
capture error or mismatch disables graphs for good and the product runs
eagerly, so graphs are an optimisation that can never change an answer.

Without CUDA (``capture=False``) the same buffer logic runs eagerly; the tests
use that to check everything except the capture itself.
"""
from __future__ import annotations

import warnings
import weakref
from typing import Any, Callable, Optional

import torch
from torch import Tensor

Product = Callable[[dict[str, Tensor], Tensor, Tensor, Optional[Tensor]], Tensor]

#: relative agreement (max abs difference / max abs value) the first replay must
#: reach against the eager product; fp32 reductions may reorder, nothing more.
REPLAY_RTOL = 1e-4


def padded_rows(n: int, batch_size: Optional[int], smallest: int = 32) -> int:
    """Rows a batch of ``n`` samples is padded to: a power of two ≥ n (≥ ``smallest``), capped at ``batch_size``.

    Power-of-two buckets keep the number of distinct shapes (captures) to a
    handful across all classes while wasting less than half of a bucket.
    """
    rows = max(smallest, 1 << max(0, n - 1).bit_length())
    return min(rows, batch_size) if batch_size and n <= batch_size else rows


class CaptureStreams:
    """Hands out capture streams, each held by one owner at a time.

    PyTorch keys its cuBLAS workspaces by (handle, stream), and a captured
    graph embeds the workspace of the stream it was captured on. Graphs
    captured on one stream (``torch.cuda.graph``'s shared default) therefore
    share one workspace, and replaying them concurrently on different streams
    races on it: on an H200, eight training runs replaying their step graphs
    on their own streams hung after two epochs with the SMs spinning
    (PyTorch issue 193402 describes the same sharing). An owner that may replay
    concurrently with others captures on a stream no live owner holds.
    ``new_stream()`` draws from a finite pool (PyTorch recycles 32 streams per
    priority), so a released stream is handed out again.
    """

    def __init__(self, new_stream: Callable[[], Any], key: Callable[[Any], Any], tries: int = 64) -> None:
        self._new_stream, self._key, self._tries = new_stream, key, tries
        self.held: set[Any] = set()

    def lease(self, owner: object) -> Any:
        """A stream no other live owner holds; released when ``owner`` is collected."""
        for _ in range(self._tries):
            stream = self._new_stream()
            key = self._key(stream)
            if key not in self.held:
                self.held.add(key)
                weakref.finalize(owner, self.held.discard, key)
                return stream
        raise RuntimeError(f"no free CUDA stream to capture on: {len(self.held)} owners hold graphs in this process")


#: Capture streams come from PyTorch's high-priority pool: plain ``torch.cuda.Stream()``
#: (replay streams, eager work) draws from the other one, so eager cuBLAS calls never
#: share a captured graph's workspace.
CAPTURE_STREAMS = CaptureStreams(lambda: torch.cuda.Stream(priority=-1), lambda s: (s.device.index, s.cuda_stream))


def capture_graph(fn: Callable[[], Any], warmup: int, pool: Any = None, stream: Any = None) -> tuple[Any, Any, Any]:
    """``(graph, result of the last warm-up, output of the captured call)`` for ``fn()``.

    The warm-up calls and the capture run on ``stream`` (default: a new side
    stream; pass one from :data:`CAPTURE_STREAMS` when graphs may replay
    concurrently), as capture requires (cuDNN autotuning, the allocator and
    the stream's cuBLAS workspace settle there); exceptions propagate.
    """
    side = stream if stream is not None else torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    expected = None
    with torch.cuda.stream(side):
        for _ in range(warmup):
            expected = fn()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool, stream=side):
        out = fn()
    torch.cuda.current_stream().wait_stream(side)
    return graph, expected, out


class _Slot:
    """Static buffers (and the graph, when captured) for one input signature."""

    def __init__(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor, real: Optional[Tensor]) -> None:
        self.tangents = {n: t.clone() for n, t in tangents.items()}
        self.x, self.y = x.clone(), y.clone()
        self.real = real.clone() if real is not None else None
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.out: Optional[Tensor] = None
        # The tangent dict last copied in, held (not its id(): a freed dict's id is
        # reused by the next one, which would silently skip copying new vectors).
        self.tangents_of = tangents

    def load(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor, real: Optional[Tensor]) -> None:
        if self.tangents_of is not tangents:  # one block product reuses its tangents for every batch
            for n, t in tangents.items():
                self.tangents[n].copy_(t)
            self.tangents_of = tangents
        self.x.copy_(x)
        self.y.copy_(y)
        if real is not None:
            self.real.copy_(real)


class GraphedProduct:
    """``fn`` replayed from static buffers, as one CUDA graph per input signature.

    Args:
        fn: ``fn(tangents, x, y, real) -> Tensor`` of shape ``(k, d)``; pure
            (no host synchronisation, no randomness), so it can be captured.
        capture: capture CUDA graphs (``True`` needs the inputs on a CUDA
            device); ``False`` runs ``fn`` eagerly on the static buffers.
        warmup: eager runs on a side stream before a capture.

    The returned tensor is the graph's static output: read it before the next
    call (the operator accumulates it at once).
    """

    def __init__(self, fn: Product, capture: bool = True, warmup: int = 2) -> None:
        self.fn, self.capture, self.warmup = fn, capture, warmup
        self._slots: dict[tuple, _Slot] = {}
        self._pool = None
        self._stream: Any = None  # one capture stream for all signatures (replays are sequential)
        self.failed: Optional[str] = None  # why graphs were given up, if they were
        self.num_captures = 0

    @staticmethod
    def _signature(tangents: dict[str, Tensor], x: Tensor, y: Tensor, real: Optional[Tensor]) -> tuple:
        k = next(iter(tangents.values())).shape[0]
        return (tuple(x.shape), x.dtype, x.device, tuple(y.shape), y.dtype, real is None, k)

    def __call__(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor, real: Optional[Tensor]) -> Tensor:
        if self.failed is not None:
            return self.fn(tangents, x, y, real)
        key = self._signature(tangents, x, y, real)
        slot = self._slots.get(key)
        if slot is None:
            slot = self._slots[key] = _Slot(tangents, x, y, real)
            if self.capture:
                return self._capture(slot, key)
        else:
            slot.load(tangents, x, y, real)
        if slot.graph is None:
            return self.fn(slot.tangents, slot.x, slot.y, slot.real)
        slot.graph.replay()
        return slot.out

    def _capture(self, slot: _Slot, key: tuple) -> Tensor:
        """Warm up, capture and check one signature; eager result if anything goes wrong."""
        args = (slot.tangents, slot.x, slot.y, slot.real)
        try:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()  # replays are sequential: one pool serves all
            if self._stream is None:
                self._stream = CAPTURE_STREAMS.lease(self)
            graph, expected, out = capture_graph(lambda: self.fn(*args), self.warmup, self._pool, self._stream)
            graph.replay()
            scale = expected.abs().max().clamp_min(torch.finfo(expected.dtype).tiny)
            error = float((out - expected).abs().max() / scale)
            if not error <= REPLAY_RTOL:
                raise RuntimeError(f"the replayed product differs from the eager one by {error:.2e} (relative)")
        except Exception as exc:  # an optimisation only: fall back to eager products
            self._give_up(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            self._slots.pop(key, None)
            return self.fn(*args)
        slot.graph, slot.out = graph, out
        self.num_captures += 1
        return out

    def _give_up(self, why: str) -> None:
        self.failed = why
        self._slots.clear()
        warnings.warn(f"CUDA graphs of the Hessian-vector product disabled ({why}); products run eagerly",
                      RuntimeWarning, stacklevel=3)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
