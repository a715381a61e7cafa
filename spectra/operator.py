"""The Hessian of a model's mean loss over a data set, as a linear operator.

``H = ∇²_θ L(θ)`` with ``L(θ) = (1/N) Σ_i ℓ(f_θ(x_i), y_i)``, the mean of the
per-sample loss over *all* N samples of the data (batches of unequal size are
weighted by their size), w.r.t. the selected parameters θ, other parameters
and buffers held fixed. ``H @ v`` is a Hessian-vector product (HVP) computed
batch by batch and summed; nothing of size d×d is ever formed.
"""
from __future__ import annotations

import contextlib
import copy
import fnmatch
import types
import warnings
from collections.abc import Iterator as OneShotIterator
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp, vmap

from .data import Batch, DataLike, iter_batches, rebatch
from .graphed_product import GraphedProduct, padded_rows

LossFn = Callable[[Tensor, Tensor], Tensor]
ParamSpec = Union[None, str, Sequence[Union[str, nn.Parameter]]]
METHODS = ("auto", "forward-over-reverse", "double-backward")


def select_parameters(model: nn.Module, params: ParamSpec) -> list[str]:
    """Names of the trainable parameters selected by ``params``.

    ``None``: every parameter with ``requires_grad``. A string or a list of
    strings: exact names or ``fnmatch`` patterns (``"layer3.*"``). A list of
    ``nn.Parameter`` objects: those parameters. Raises ``ValueError`` naming
    every pattern that matches no trainable parameter, even when others match.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if params is None:
        names = [n for n, _ in named]
    else:
        specs = [params] if isinstance(params, str) else list(params)
        by_id = {id(p): n for n, p in named}
        names = []
        for n, p in named:
            for s in specs:
                hit = (id(s) == id(p)) if isinstance(s, Tensor) else (n == s or fnmatch.fnmatchcase(n, s))
                if hit:
                    names.append(n)
                    break
        for s in specs:
            if isinstance(s, Tensor) and id(s) not in by_id:
                raise ValueError("a tensor in `params` is not a trainable parameter of the model")
        unmatched = [s for s in specs if not isinstance(s, Tensor)
                     and not any(n == s or fnmatch.fnmatchcase(n, s) for n, _ in named)]
        if unmatched:  # a misspelt pattern must not silently shrink the parameter set
            raise ValueError(f"no trainable parameter matches {', '.join(map(repr, unmatched))}")
        if not names:
            raise ValueError(f"no trainable parameter matches {specs!r}")
    if not names:
        raise ValueError("the model has no trainable parameters")
    return names


@contextlib.contextmanager
def _backend_flags(tf32: bool, cudnn_benchmark: Optional[bool] = None) -> Iterator[None]:
    """Set TF32 (matmuls, cuDNN convolutions) and optionally cuDNN autotuning, restoring the old settings."""
    cuda, cudnn = torch.backends.cuda.matmul, torch.backends.cudnn
    old = (cuda.allow_tf32, cudnn.allow_tf32, cudnn.benchmark)
    cuda.allow_tf32 = cudnn.allow_tf32 = tf32
    if cudnn_benchmark is not None:
        cudnn.benchmark = cudnn_benchmark
    try:
        yield
    finally:
        cuda.allow_tf32, cudnn.allow_tf32, cudnn.benchmark = old


@contextlib.contextmanager
def _mode(model: nn.Module, train: bool) -> Iterator[None]:
    """Put every submodule in train/eval mode, restoring each module's flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.train(train)
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def _has_running_stats(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_var is not None


def _is_stochastic(module: nn.Module) -> bool:
    """Whether ``module`` draws random numbers in train mode: dropout of any kind
    (``p > 0``), RReLU, and stochastic-depth style layers (a ``*Drop*`` or
    ``*Stochastic*`` class with a ``p > 0``)."""
    if isinstance(module, nn.modules.dropout._DropoutNd):
        return module.p > 0
    if isinstance(module, nn.RReLU):
        return module.lower != module.upper
    name = type(module).__name__.lower()
    p = getattr(module, "p", None)
    return ("drop" in name or "stochastic" in name) and isinstance(p, (int, float)) and p > 0


def _refuse_random_train_mode(model: nn.Module) -> None:
    """Train mode with a stochastic layer makes the loss a random function of θ:
    its "Hessian" is not one matrix (each product sees another mask, or, with a kept
    graph, one frozen mask is analysed), so the eigenvalues would be meaningless."""
    stochastic = sorted({type(m).__name__ for m in model.modules() if _is_stochastic(m)})
    if stochastic:
        raise ValueError(f"eval_mode=False with stochastic layers ({', '.join(stochastic)}) makes the loss random, "
                         "so it has no Hessian; use eval_mode=True (dropout off)")


def _refuse_one_shot(data: DataLike) -> None:
    """An iterator (a generator, ``iter(list)``) can be read once; uncached, every product
    reads the data anew and would see no batch at all after the first pass."""
    if isinstance(data, OneShotIterator):
        raise ValueError("data is a one-shot iterator (e.g. a generator) but cache_data=False reads it for every "
                         "product; pass a list or DataLoader, or cache_data=True")


def _affine_batchnorm_forward(self: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Eval-mode BatchNorm written as the per-channel affine map it is.

    ``γ (x − μ)/√(σ² + ε) + β`` with running μ, σ²: the same function as
    ``F.batch_norm(training=False)``, but its derivatives are plain products,
    which makes jvp-of-grad markedly cheaper than differentiating through
    ``batch_norm_backward`` (measured in docs/performance.md).
    """
    scale = torch.rsqrt(self.running_var + self.eps)
    if self.weight is not None:
        scale = scale * self.weight
    shift = -self.running_mean * scale
    if self.bias is not None:
        shift = shift + self.bias
    shape = (1, -1) + (1,) * (x.ndim - 2)
    return x * scale.reshape(shape) + shift.reshape(shape)


def _check_precision_and_reduction(dtype: torch.dtype, loss_fn: Any) -> None:
    """Refuse a torch loss that does not average over its batch (``reduction='sum'`` would
    scale the Hessian by the batch sizes, ``'none'`` is not a scalar); warn on half precision,
    whose ~1e-3 relative rounding swamps the small eigenvalues (λmin) this operator is for."""
    reduction = getattr(loss_fn, "reduction", "mean") if isinstance(loss_fn, nn.modules.loss._Loss) else "mean"
    if reduction != "mean":
        raise ValueError(f"loss_fn must average over its batch (reduction='mean'), got reduction={reduction!r}: "
                         "the operator forms the Hessian of the mean loss over the samples itself")
    if dtype in (torch.float16, torch.bfloat16):
        warnings.warn(f"Hessian-vector products in {str(dtype).removeprefix('torch.')} carry ~1e-3 relative "
                      "rounding; pass dtype=torch.float32 or torch.float64", RuntimeWarning, stacklevel=3)


class HessianOperator:
    """Hessian of the mean loss of ``model`` over ``data`` as a linear operator.

    Math: ``H = ∇²_θ (1/N) Σ_{i=1}^{N} ℓ(f_θ(x_i), y_i)``, where ``loss_fn``
    returns the **mean** of ℓ over a batch (as ``nn.CrossEntropyLoss()`` does);
    a batch of ``n_b`` samples is weighted by ``n_b / N``, so the result does
    not depend on how the data are batched. θ are the parameters chosen by
    ``params`` (default: all trainable), flattened in ``model.named_parameters()``
    order; ``H.dim`` is their total size.

    Args:
        model: any ``nn.Module``; it is not modified (a converted copy is used
            when ``dtype``/``device`` differ from the model's).
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` batch mean.
        data: an iterable of ``(inputs, targets)`` batches (a ``DataLoader``, a
            list), a map-style ``Dataset`` or a pair of tensors.
        params: ``None``, parameter names / ``fnmatch`` patterns, or parameters.
        dtype: compute dtype (default: the model's); floating inputs are cast.
        device: compute device (default: the model's).
        method: ``"forward-over-reverse"`` (``torch.func`` jvp of grad; several
            vectors per pass through ``vmap``), ``"double-backward"``
            (autograd, one graph then one backward per vector of a block; also
            for models ``torch.func`` cannot trace) or ``"auto"`` (default):
            double backward on a CPU, where it was measured faster (ResNet-8,
            195 images, one thread, medians: one vector 0.83 s vs 1.00 s, a
            block of 4 2.56 s vs 5.69 s), forward-over-reverse on GPUs (blocks
            through ``vmap``: 1.75 gradient passes per vector of a block of 4
            on an H200). Both are exact; they differ only in rounding.
        eval_mode: evaluate the model in eval mode (default; BatchNorm uses its
            running statistics, dropout is off), which makes H a fixed matrix.
            ``False`` uses train mode (batch statistics, double backward only);
            it raises ``ValueError`` for a model with stochastic layers (dropout
            with ``p > 0``, RReLU, stochastic depth): their loss is a random
            function of θ, so there is no Hessian to analyse (each product would
            see another random mask, or a kept graph one frozen mask).
        batch_size: re-cut the cached data into batches of this size (larger
            batches are faster on GPUs; the result is the same).
        cache_data: hold all batches on ``device`` (default). ``False`` iterates
            ``data`` anew for every product (for data that does not fit): ``data``
            must then be re-iterable (a list, a ``DataLoader``; a generator or
            other iterator raises ``ValueError``) and give the same number of
            samples on every pass (a pass that differs raises ``RuntimeError``).
        max_block: most vectors pushed through one ``vmap`` pass (memory bound).
        allow_tf32: allow TF32 on Ampere+ GPUs (fast, ~1e-3 relative error);
            off by default, so products are accurate fp32/fp64.
        distributed: all-reduce the products over the default process group,
            each rank holding a disjoint shard of the samples. ``None`` (default)
            does so whenever ``torch.distributed`` is initialised with more than
            one rank.
        compile: ``torch.compile`` the batched jvp-of-grad product (GPUs; the
            first products pay the compilation). Give ``batch_size`` too: batches
            are then padded to that one static shape (exactly, see
            ``_product_batches``), so a single compilation serves all data.
        keep_graph: keep the double-backward gradient graph of every batch
            between products (built by the first product), so each later
            product is one backward pass: measured 0.49 s instead of 0.92 s
            per product (ResNet-8, 195 images, CPU). ``None`` (default) keeps it
            exactly when the products are double backward on cached data of a
            *single* batch: every product builds that graph anyway, so keeping
            it adds no activation memory beyond a product's own. ``True`` keeps
            the graphs of all batches alive: about 2× a training step's saved
            activations (ResNet-32, fp32: 4.6 MiB per image against 2.3 MiB,
            i.e. 23 GiB for a 5,000-image class); ``False`` never keeps.
        graphs: replay the product as CUDA graphs (:mod:`spectra.graphed_product`):
            batches are padded (exactly) to power-of-two row counts up to
            ``batch_size``, each shape captured once and checked against an
            eager product; cuDNN autotuning is on. Removes the launch and
            dispatch overhead that dominates eager products on a GPU. On a CPU
            it warns and runs the same padded products eagerly.

    ``H @ v`` accepts a vector of shape ``(d,)`` or a block ``(d, k)`` in any
    floating dtype and device, and returns the product in float64 on ``v``'s
    device (batch contributions are accumulated in float64).
    """

    def __init__(self, model: nn.Module, loss_fn: LossFn, data: DataLike,
                 params: ParamSpec = None, dtype: Optional[torch.dtype] = None,
                 device: Union[None, str, torch.device] = None,
                 method: str = "auto", *, eval_mode: bool = True,
                 batch_size: Optional[int] = None, cache_data: bool = True,
                 max_block: Optional[int] = None, allow_tf32: bool = False,
                 distributed: Optional[bool] = None, compile: bool = False,
                 graphs: bool = False, keep_graph: Optional[bool] = None) -> None:
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
        if not eval_mode:
            _refuse_random_train_mode(model)
        if not cache_data:
            _refuse_one_shot(data)
        if not eval_mode and method != "double-backward":
            method = "double-backward"  # in-place BatchNorm updates cannot be vmapped
        if (compile or graphs) and method == "auto":
            method = "forward-over-reverse"  # the product that compiles / captures
        first = next(iter(model.parameters()), None)
        if first is None:
            raise ValueError("the model has no parameters")
        self.device = torch.device(device) if device is not None else first.device
        self.dtype = dtype or first.dtype
        self.method, self.eval_mode = method, eval_mode
        # Products through vmap'd forward-over-reverse, else double backward ("auto": vmap on GPUs only).
        self.uses_vmap = method == "forward-over-reverse" or (
            method == "auto" and keep_graph is not True and self.device.type != "cpu")
        _check_precision_and_reduction(self.dtype, loss_fn)
        if isinstance(loss_fn, nn.Module):  # its buffers (class weights, margins) follow the compute dtype/device
            loss_fn = copy.deepcopy(loss_fn).to(device=self.device, dtype=self.dtype)
        self.loss_fn, self.max_block, self.allow_tf32 = loss_fn, max_block, allow_tf32
        if compile and method != "forward-over-reverse":
            raise ValueError("compile=True needs method='forward-over-reverse'")
        if graphs and method != "forward-over-reverse":
            raise ValueError("graphs=True needs method='forward-over-reverse'")
        if graphs and not eval_mode:
            raise ValueError("graphs=True needs eval_mode=True (train-mode BatchNorm updates its statistics)")
        self.compile, self.graphs = compile, graphs
        if keep_graph and (method == "forward-over-reverse" or graphs or compile or not cache_data):
            raise ValueError("keep_graph=True needs double-backward products on cached data "
                             "(method='auto' on a CPU or 'double-backward', cache_data=True, no compile/graphs)")
        self._keep_graph = keep_graph
        self._row_mean_checked = False
        self.param_names = select_parameters(model, params)  # by identity: before any copy
        self.model = self._converted(model)
        self._owns_weights = self.model is not model  # a converted copy: load_weights may write to it
        self._module_types = [type(m) for m in model.modules()]
        state = dict(self.model.named_parameters())
        state.update(self.model.named_buffers())
        self._params = {n: state.pop(n).detach() for n in self.param_names}
        self._frozen = {n: t.detach() for n, t in state.items()}
        self.param_shapes = [p.shape for p in self._params.values()]
        self.param_numels = [p.numel() for p in self._params.values()]
        self.dim = sum(self.param_numels)
        self._data, self._batch_size = data, batch_size
        self._cache: Optional[list[Batch]] = self._load_batches() if cache_data else None
        self._kept_graphs = self._graph_store()
        self._distributed = self._resolve_distributed(distributed)
        self.num_samples = self._count_samples()
        if self.num_samples == 0:
            raise ValueError("the data set is empty: no samples to build a Hessian from")
        self.num_matvecs = 0
        self.num_passes = 0
        self._product = self._make_product()

    def with_data(self, data: DataLike, batch_size: Optional[int] = None) -> "HessianOperator":
        """The Hessian of the same model, loss and parameters on other ``data`` (e.g. another class).

        The new operator shares this one's converted model and its compiled or
        captured products (no new compilation or capture for shapes seen
        before); it has its own batches, sample count and product counters.
        """
        if self._cache is None:
            _refuse_one_shot(data)
        other = copy.copy(self)
        other._data = data
        other._batch_size = batch_size if batch_size is not None else self._batch_size
        other._cache = other._load_batches() if self._cache is not None else None
        other.num_samples = other._count_samples()
        if other.num_samples == 0:
            raise ValueError("the data set is empty: no samples to build a Hessian from")
        other.num_matvecs = other.num_passes = 0
        other._row_mean_checked = False
        other._kept_graphs = other._graph_store()
        return other

    @property
    def owns_weights(self) -> bool:
        """Whether the operator computes with its own copy of the weights (the model was converted:
        BatchNorm folded, or another device/dtype), so :meth:`load_weights` cannot touch the caller's."""
        return self._owns_weights

    def load_weights(self, model: nn.Module) -> None:
        """Compute from now on at ``model``'s weights: copied in place into this operator's tensors.

        For a model of the same architecture (module types, parameter and buffer names and
        shapes; the caller vouches for its non-tensor attributes), e.g. the next checkpoint of
        a run. Every operator made from this one by :meth:`with_data` shares the tensors, and
        its compiled or captured products read them, so nothing is compiled or captured again.
        Raises ``ValueError`` for another architecture or when the operator does not own its
        weights (:attr:`owns_weights`).
        """
        if not self.owns_weights:
            raise ValueError("this operator computes with the caller's model tensors; "
                             "load_weights would overwrite them")
        new = dict(model.named_parameters())
        new.update(model.named_buffers())
        mine = {**self._frozen, **self._params}
        if ([type(m) for m in model.modules()] != self._module_types or set(new) != set(mine)
                or any(new[n].shape != t.shape for n, t in mine.items())):
            raise ValueError("load_weights needs a model of the same architecture "
                             "(module types, parameter and buffer names and shapes)")
        with torch.no_grad():
            for name, t in mine.items():
                t.copy_(new[name])
        self._kept_graphs = self._graph_store()  # kept gradient graphs belong to the old weights

    def _graph_store(self) -> Optional[dict[int, tuple]]:
        """Where kept gradient graphs go (``None``: rebuilt every product), see ``keep_graph``."""
        keep = self._keep_graph
        if keep is None:  # auto: only where keeping costs no extra peak memory
            keep = not self.uses_vmap and self._cache is not None and len(self._cache) == 1
        return {} if keep else None

    @property
    def product_method(self) -> str:
        """How products are formed once ``method="auto"`` is resolved: forward-over-reverse or double-backward."""
        return "forward-over-reverse" if self.uses_vmap else "double-backward"

    @property
    def keeps_graphs(self) -> bool:
        """Whether gradient graphs are kept between products (``keep_graph`` resolved)."""
        return self._kept_graphs is not None

    # ----------------------------------------------------------------- setup
    def _converted(self, model: nn.Module) -> nn.Module:
        """The model on the compute device/dtype, with eval-mode BatchNorm as affine maps.

        The caller's model is never modified: a copy is made whenever anything
        must change.
        """
        tensors = list(model.parameters()) + list(model.buffers())
        same = all(t.device == self.device and (t.dtype == self.dtype or not t.is_floating_point())
                   for t in tensors)
        fold = self.eval_mode and any(_has_running_stats(m) for m in model.modules())
        if same and not fold:
            return model
        model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
        if fold:
            for m in model.modules():
                if _has_running_stats(m):
                    m.forward = types.MethodType(_affine_batchnorm_forward, m)
        return model

    def _to_device(self, batch: Batch) -> Batch:
        x, y = batch
        x = x.to(self.device, self.dtype if x.is_floating_point() else None, non_blocking=True)
        return x, torch.as_tensor(y).to(self.device, non_blocking=True)

    def _load_batches(self) -> list[Batch]:
        batches = [self._to_device(b) for b in iter_batches(self._data, self._batch_size)]
        batches = [b for b in batches if len(b[1]) > 0]
        if self._batch_size and len(batches) > 1:
            batches = rebatch(batches, self._batch_size)
        return batches

    def _product_batches(self) -> Iterator[tuple[Tensor, Tensor, Optional[Tensor]]]:
        """Batches for products: ``(x, y, real)``; padded to static shapes under compile/graphs.

        A batch of n rows is padded to B rows (``_padded_rows``) by repeating
        its own rows; ``real`` marks the genuine ones, whose outputs alone carry
        derivatives. For a loss that is a mean of per-sample terms the padded
        batch mean is ``(n/B)·mean_real + const``, so weighting the product by
        B instead of n is exact (checked once per operator: ``_check_row_mean``).
        """
        for x, y in self.batches():
            n = len(y)
            pad_to = self._padded_rows(n)
            if pad_to is None or n == pad_to:
                yield x, y, (torch.ones(n, dtype=torch.bool, device=x.device) if pad_to else None)
                continue
            if not self._row_mean_checked:
                self._check_row_mean(x, y)
            rows = torch.arange(pad_to, device=x.device) % n
            yield x[rows], y[rows], rows == torch.arange(pad_to, device=x.device)

    def check_static_shapes(self) -> None:
        """Raise ``ValueError`` now, not at the first padded product, if padding this data to
        static shapes (``compile``/``graphs``) would be inexact for the loss and model."""
        if self._row_mean_checked or not (self.compile or self.graphs):
            return
        for x, y in self.batches():
            if self._padded_rows(len(y)) not in (None, len(y)):
                self._check_row_mean(x, y)
                return

    def _check_row_mean(self, x: Tensor, y: Tensor) -> None:
        """Padding is exact only if the loss is a plain mean of per-row terms; refuse otherwise.

        A class-weighted mean over a batch of mixed classes (``Σ w_i ℓ_i / Σ w_i``)
        is not: repeated rows would change its weights. Compared on up to 4 rows:
        the loss of rows (0, 0, 1, 2, 3) against the mean of their single-row losses.
        """
        idx = torch.tensor([0, 0, 1, 2, 3], device=x.device)[: len(y) + 1] % len(y)
        with torch.no_grad(), _mode(self.model, False):
            out = functional_call(self.model, {**self._frozen, **self._params}, (x[idx],))
            whole = self.loss_fn(out, y[idx])
            rows = torch.stack([self.loss_fn(out[i:i + 1], y[idx][i:i + 1]) for i in range(len(idx))])
        if not torch.allclose(whole, rows.mean(), rtol=1e-5, atol=1e-12):
            raise ValueError("compile/graphs pad batches to static shapes, which is exact only for a loss that is "
                             "a plain mean over samples; this loss is not (class weights over mixed classes?): "
                             "use per-class data or compile=False, graphs=False")
        self._row_mean_checked = True

    def _padded_rows(self, n: int) -> Optional[int]:
        """Static row count for a batch of n under compile (one shape) or graphs (buckets); None: as is."""
        if self.compile and self._batch_size:
            return self._batch_size  # every new shape would cost a compilation
        if self.graphs:
            return padded_rows(n, self._batch_size)
        return None

    def batches(self) -> Iterator[Batch]:
        """The batches of this rank, on the compute device.

        Uncached data is read anew; a pass that yields another number of samples
        than the operator was built on raises ``RuntimeError`` at its end (else a
        product over an exhausted iterable would silently be a sum over nothing).
        """
        if self._cache is not None:
            yield from self._cache
            return
        seen = 0
        for batch in self._read_batches():
            seen += len(batch[1])
            yield batch
        if seen != self._local_samples:
            raise RuntimeError(f"the data gave {seen} samples on this pass but {self._local_samples} when the "
                               "Hessian operator was built; uncached data must give the same samples on every pass")

    def _read_batches(self) -> Iterator[Batch]:
        """A fresh pass over the (uncached) data, empty batches dropped."""
        for b in iter_batches(self._data, self._batch_size):
            if len(b[1]) > 0:
                yield self._to_device(b)

    @staticmethod
    def _resolve_distributed(flag: Optional[bool]) -> bool:
        dist = torch.distributed
        ready = dist.is_available() and dist.is_initialized()
        if flag and not ready:
            raise ValueError("distributed=True needs an initialised torch.distributed process group")
        return bool(ready and dist.get_world_size() > 1) if flag is None else bool(flag)

    def _all_reduce(self, t: Tensor) -> Tensor:
        """Sum ``t`` over ranks (gloo reduces on the CPU, NCCL on the GPU)."""
        if not self._distributed:
            return t
        on_gpu = torch.distributed.get_backend() == "nccl"
        buf = t if on_gpu else t.cpu()
        torch.distributed.all_reduce(buf)
        return buf.to(t.device)

    def _count_samples(self) -> int:
        """Samples over all ranks; remembers this rank's count, which every later pass must give."""
        local = sum(len(y) for _, y in (self._cache if self._cache is not None else self._read_batches()))
        self._local_samples = local
        total = torch.tensor([float(local)], dtype=torch.float64, device=self.device)
        return int(self._all_reduce(total).item())

    # ------------------------------------------------------------ interface
    @property
    def shape(self) -> tuple[int, int]:
        return (self.dim, self.dim)

    def parameters_flat(self) -> Tensor:
        """The selected parameters θ as one flat vector (compute dtype)."""
        return torch.cat([p.reshape(-1) for p in self._params.values()])

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.matmul(v)

    def matmul(self, v: Tensor) -> Tensor:
        """``H v`` for ``v`` of shape ``(d,)`` or ``(d, k)``; float64 result on ``v``'s device."""
        if v.ndim not in (1, 2) or v.shape[0] != self.dim:
            raise ValueError(f"expected a vector of shape ({self.dim},) or ({self.dim}, k), got {tuple(v.shape)}")
        block = v.reshape(self.dim, -1)
        out = torch.empty(block.shape, dtype=torch.float64, device=v.device)
        step = self.max_block or block.shape[1]
        for start in range(0, block.shape[1], step):
            cols = block[:, start:start + step]
            out[:, start:start + step] = self._block_product(cols).to(v.device)
        return out.reshape(v.shape)

    def loss(self) -> float:
        """The mean loss L(θ) over all samples (float64)."""
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        with torch.no_grad(), _backend_flags(self.allow_tf32), _mode(self.model, not self.eval_mode):
            for x, y in self.batches():
                total += len(y) * self._batch_loss(self._params, x, y).double()
        return float(self._all_reduce(total).item()) / self.num_samples

    def gradient(self) -> Tensor:
        """∇L(θ), flat, float64."""
        total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        grad_fn = grad(self._batch_loss)
        with _backend_flags(self.allow_tf32), _mode(self.model, not self.eval_mode):
            for x, y in self.batches():
                g = grad_fn(self._params, x, y)
                total += len(y) * torch.cat([t.reshape(-1) for t in g.values()]).double()
        return self._all_reduce(total) / self.num_samples

    # ------------------------------------------------------------- products
    def _batch_loss(self, params: dict[str, Tensor], x: Tensor, y: Tensor,
                    real: Optional[Tensor] = None) -> Tensor:
        out = functional_call(self.model, {**self._frozen, **params}, (x,))
        if real is not None:  # padding rows: same shape, no derivative (eval mode: rows independent)
            out = torch.where(real.view(-1, *(1,) * (out.ndim - 1)), out, out.detach())
        return self.loss_fn(out, y)

    def _split(self, cols: Tensor) -> dict[str, Tensor]:
        """(d, k) block -> {name: (k, *shape)} tangents in the compute dtype."""
        cols = cols.to(self.device, self.dtype).T
        chunks = torch.split(cols, self.param_numels, dim=1)
        return {n: c.reshape(c.shape[0], *s) for n, c, s in zip(self._params, chunks, self.param_shapes)}

    def _block_product(self, cols: Tensor) -> Tensor:
        tangents = self._split(cols)
        k = cols.shape[1]
        acc = torch.zeros(k, self.dim, dtype=torch.float64, device=self.device)
        product = self._hvp_forward_over_reverse if self.uses_vmap else self._hvp_double_backward
        static_shapes = self.compile or self.graphs
        with _backend_flags(self.allow_tf32, True if static_shapes else None), _mode(self.model, not self.eval_mode):
            for i, (x, y, real) in enumerate(self._product_batches()):
                acc.add_(product(tangents, x, y, real, i), alpha=float(len(y)))
        self.num_matvecs += k
        self.num_passes += 1
        acc = self._all_reduce(acc)
        return acc.T.div_(self.num_samples)

    def _make_product(self) -> Callable[..., Tensor]:
        """vmap over tangents of jvp(grad(batch loss)): k HVPs of one batch in one pass."""
        grad_fn = grad(self._batch_loss)

        def product(params: dict[str, Tensor], tangents: dict[str, Tensor], x: Tensor, y: Tensor,
                    real: Optional[Tensor]) -> Tensor:
            def single(v: dict[str, Tensor]) -> Tensor:
                _, hv = jvp(lambda p: grad_fn(p, x, y, real), (params,), (v,))
                return torch.cat([t.reshape(-1) for t in hv.values()])

            return vmap(single)(tangents)

        # torch.compile traces jvp(grad) cleanly (it cannot compile a double backward)
        compiled = torch.compile(product, dynamic=False) if self.compile else product
        params = self._params

        def on_params(tangents: dict[str, Tensor], x: Tensor, y: Tensor, real: Optional[Tensor]) -> Tensor:
            return compiled(params, tangents, x, y, real)

        if not self.graphs:
            return on_params
        capture = self.device.type == "cuda"
        if not capture:
            warnings.warn("graphs=True: CUDA graphs need a CUDA device; running the padded products eagerly",
                          RuntimeWarning, stacklevel=3)
        return GraphedProduct(on_params, capture=capture)

    def _hvp_forward_over_reverse(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor,
                                  real: Optional[Tensor], index: int = 0) -> Tensor:
        return self._product(tangents, x, y, real).double()

    def _gradient_graph(self, x: Tensor, y: Tensor, real: Optional[Tensor],
                        index: int) -> tuple[tuple[Tensor, ...], list[Tensor]]:
        """The batch gradient with its graph (create_graph) and the leaves it is taken w.r.t.

        With ``keep_graph`` the graph of every batch is built once and kept: it
        depends on θ and the data only, not on the vectors, so each later product
        is a single backward pass through it (bit-identical results).
        """
        if self._kept_graphs is not None and index in self._kept_graphs:
            return self._kept_graphs[index]
        params = {n: p.detach().requires_grad_(True) for n, p in self._params.items()}
        leaves = list(params.values())
        with torch.enable_grad():
            g = torch.autograd.grad(self._batch_loss(params, x, y, real), leaves, create_graph=True)
        if self._kept_graphs is not None:
            self._kept_graphs[index] = (g, leaves)
        return g, leaves

    def _hvp_double_backward(self, tangents: dict[str, Tensor], x: Tensor, y: Tensor,
                             real: Optional[Tensor], index: int = 0) -> Tensor:
        g, leaves = self._gradient_graph(x, y, real, index)
        keep = self._kept_graphs is not None
        with torch.enable_grad():
            k = next(iter(tangents.values())).shape[0]
            rows = []
            for j in range(k):
                dot = sum((gi * tangents[n][j]).sum() for gi, n in zip(g, self._params))
                hv = torch.autograd.grad(dot, leaves, retain_graph=keep or j < k - 1, allow_unused=True)
                rows.append(torch.cat([(h if h is not None else torch.zeros_like(p)).reshape(-1)
                                       for h, p in zip(hv, leaves)]))
        return torch.stack(rows).double()

    def to_dense(self) -> Tensor:
        """The full d×d matrix from d products (small models only)."""
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.device)
        return torch.cat([self.matmul(eye[:, i:i + 64]) for i in range(0, self.dim, 64)], dim=1)

    def __repr__(self) -> str:
        return (f"HessianOperator(dim={self.dim}, samples={self.num_samples}, dtype={self.dtype}, "
                f"device={self.device}, method={self.method!r}, eval_mode={self.eval_mode})")
