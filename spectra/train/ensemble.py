"""Several runs of one architecture trained as ONE vectorised step (``torch.func.vmap``).

Training ResNet-32 at batch 128 is launch-bound: a GPU runs each small kernel
of one run far below its capacity. An ensemble of K runs stacks their
parameters, BatchNorm buffers, momentum buffers, class weights and training
accumulators into ``(K, …)`` tensors and runs a single step in which every
kernel does the work of all K runs: the forward pass is
``vmap(functional_call(model, ·))`` over the stacked weights on the shared
batch, the loss is one formula for all losses, the backward pass is that of
``Σ_k loss_k`` (member k's loss depends only on slice k, so the gradient of the
sum is the stack of the members' gradients), SAM and the SGD update act on the
stacked tensors.

Members share everything that shapes the computation or the data (see
:data:`SHARED_SETTINGS` — same seeds, so they see identical batches and start
from identical weights, exactly like separate runs) and may differ in the loss
(CE / LDAM / VS and their parameters), DRW and SAM's ρ. Each member is an
ordinary :class:`~spectra.train.trainer.Trainer` whose parameters, buffers,
momentum buffers, class weights and accumulators are *views* into the
stacked tensors: its own epoch set-up, evaluation, checkpoints, logs, summary
and resume code read the live values without copying; only its step is
replaced.

Loss of member k, one formula for CE, LDAM and VS (``z``: logits, ``y``: label)::

    z' = s_k · (a_k ⊙ z + b_k − m_{k,y} e_y)
    loss_k = Σ_i w_{k,y_i} (logsumexp z'_i − z'_{i,y_i}) / Σ_i w_{k,y_i}

CE: ``a = 1, b = 0, m = 0, s = 1``; LDAM: ``m`` = its margins, ``s`` its scale;
VS: ``a = Δ``, ``b = ι``; ``w`` = the member's class weights (DRW switches them
in place at its epoch).
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vmap

from .config import TrainConfig
from .losses import LDAMLoss, VSLoss, WeightedCrossEntropy
from .sgd import TensorLRSGD
from .lockstep import run_in_lockstep
from .trainer import FitResult, Trainer, capture_step_graph, gradients_into

__all__ = ["Ensemble", "fit_ensemble", "fit_ensembles", "group_for_ensembles", "check_ensemble_compatible", "MEMBER_SETTINGS"]

# Settings in which members of one ensemble may differ: the loss, DRW and ρ
# (they change numbers in the step, not its graph), and per-run bookkeeping.
MEMBER_SETTINGS = frozenset({
    "method", "loss", "ldam_max_margin", "ldam_scale", "vs_gamma", "vs_tau", "drw", "drw_epoch", "drw_beta", "rho",
    "eval_every", "eval_batch_size", "save_every", "snapshot_optimizer", "tail_fraction", "max_test_samples", "progress",
    "spectra_every", "spectra_samples_per_class", "spectra_batch_size", "spectra_max_iter",
})
VECTORISED_OPTIMIZERS = ("sgd", "sam")
VECTORISED_COMPILE_MODES = ("off", "graphs", "auto")


def _shared_key(config: TrainConfig) -> tuple[tuple[str, str], ...]:
    return tuple((k, repr(v)) for k, v in config.to_dict().items() if k not in MEMBER_SETTINGS)


def _not_vectorisable(config: TrainConfig) -> str | None:
    """Why ``config`` cannot be an ensemble member (None: it can)."""
    if config.optimizer not in VECTORISED_OPTIMIZERS:
        return (f"uses optimizer {config.optimizer!r}; ensembles train {' or '.join(VECTORISED_OPTIMIZERS)} only "
                "(train it with fit or fit_many)")
    if config.compile not in VECTORISED_COMPILE_MODES:
        return f"has compile={config.compile!r}; ensembles support {', '.join(VECTORISED_COMPILE_MODES)}"
    if config.last_batch == "short":
        return "has last_batch='short' (a last batch of another shape); ensembles train with 'wrap' or 'drop'"
    return None


def check_ensemble_compatible(configs: Sequence[TrainConfig]) -> None:
    """Raise a one-line ``ValueError`` naming the first setting in which a
    member differs from member 0 where it must not, or a member that cannot
    be vectorised (PGD / LPF-SGD, ``torch.compile`` modes, ``last_batch='short'``)."""
    if not configs:
        raise ValueError("an ensemble needs at least one run")
    for i, c in enumerate(configs):
        reason = _not_vectorisable(c)
        if reason is not None:
            raise ValueError(f"ensemble member {i} ({c.method}) {reason}")
    first = configs[0].to_dict()
    for i, c in enumerate(configs[1:], start=1):
        for key, value in c.to_dict().items():
            if key not in MEMBER_SETTINGS and value != first[key]:
                raise ValueError(f"ensemble member {i} ({c.method}) differs from member 0 ({configs[0].method}) in "
                                 f"{key}: {value!r} vs {first[key]!r}; members must share it")


def group_for_ensembles(configs: Sequence[TrainConfig]) -> list[list[int]]:
    """Partition ``configs`` (by index) into groups that can each train as one
    ensemble, in order of first appearance. PGD / LPF-SGD runs,
    ``torch.compile`` modes and ``last_batch='short'``, which cannot be
    vectorised, get groups of one.

    For the 8 methods of the CIFAR table: {ce, ce-drw, vs}, {ce-sam,
    ce-drw-sam, vs-sam}, {ldam-drw}, {ldam-drw-sam}.
    """
    groups: dict[Any, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(_shared_key(c) if _not_vectorisable(c) is None else ("alone", i), []).append(i)
    return list(groups.values())


def _adjusted_logit_parameters(loss_fn: WeightedCrossEntropy, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """``(a, b, m, s)`` of ``z' = s · (a ⊙ z + b − m_y e_y)`` that reproduce ``loss_fn``'s adjusted logits."""
    device = loss_fn.weight.device
    a, b, m, s = torch.ones(num_classes, device=device), torch.zeros(num_classes, device=device), torch.zeros(num_classes, device=device), 1.0
    if isinstance(loss_fn, LDAMLoss):
        m, s = loss_fn.margins.clone(), loss_fn.scale
    elif isinstance(loss_fn, VSLoss):
        a, b = loss_fn.scale.clone(), loss_fn.offset.clone()
    elif type(loss_fn) is not WeightedCrossEntropy:
        raise ValueError(f"ensembles cannot vectorise the loss {type(loss_fn).__name__}")
    return a, b, m, s


class StackedLoss:
    """The members' losses as one formula over stacked logits (see the module docstring).

    ``weight`` is ``(K, C)``; the members' ``loss_fn.weight`` are bound to its rows.
    """

    def __init__(self, loss_fns: Sequence[WeightedCrossEntropy]) -> None:
        num_classes = loss_fns[0].weight.shape[0]
        params = [_adjusted_logit_parameters(fn, num_classes) for fn in loss_fns]
        self.a = torch.stack([p[0] for p in params]).unsqueeze(1)  # (K, 1, C)
        self.b = torch.stack([p[1] for p in params]).unsqueeze(1)
        self.m = torch.stack([p[2] for p in params])  # (K, C)
        self.s = torch.tensor([p[3] for p in params], device=self.a.device).view(-1, 1, 1)
        self.weight = torch.stack([fn.weight.detach() for fn in loss_fns])  # (K, C)

    def __call__(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``(K,)`` losses of ``(K, B, C)`` logits for labels ``y`` ``(B,)``."""
        onehot = nn.functional.one_hot(y, logits.shape[-1]).to(logits.dtype)  # (B, C)
        margin = onehot * self.m[:, y].unsqueeze(-1)  # (K, B, C)
        z = self.s * (logits * self.a + self.b - margin)
        nll = torch.logsumexp(z, dim=-1) - z.gather(-1, y.expand(z.shape[0], -1).unsqueeze(-1)).squeeze(-1)  # (K, B)
        w = self.weight[:, y]  # (K, B)
        return (w * nll).sum(-1) / w.sum(-1)


def _bind_rows(members: Sequence[torch.Tensor]) -> torch.Tensor:
    """Stack ``members`` into ``(K, …)`` and make member k's tensor a view of row k
    (``.data`` swap: the tensor objects, which modules, optimisers and
    checkpoints hold, stay the same)."""
    stacked = torch.stack([t.detach() for t in members])
    for k, t in enumerate(members):
        t.data = stacked[k]
    return stacked


def _unbind(tensors: Sequence[torch.Tensor]) -> None:
    """Give each tensor its own storage again (results outlive the ensemble)."""
    for t in tensors:
        t.data = t.data.clone()


class _SharedEpochBatches:
    """One :class:`~spectra.train.augment.EpochBatches` for all members: the
    epoch's augmented batches are made once (members have one seed)."""

    def __init__(self, batches: Any) -> None:
        self.source = batches
        self.current: tuple[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    def epoch(self, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.current is None or self.current[0] != epoch:
            self.current = (epoch, self.source.epoch(epoch))
        return self.current[1]

    def release(self) -> None:
        self.current = None

    def __getattr__(self, name: str) -> Any:  # steps, batch_size_of, last_size, images_per_epoch, ...
        return getattr(self.source, name)


class Ensemble:
    """K runs of one architecture, trained by one vectorised step (see the module docstring).

    Has :class:`Trainer`'s epoch protocol (``begin`` … ``finish``), so
    :func:`~spectra.train.lockstep.run_in_lockstep` can drive several ensembles
    on separate CUDA streams.
    """

    def __init__(self, configs: Sequence[TrainConfig], out_dirs: Sequence[str | Path], resume: bool = False,
                 log: Callable[[str], None] | None = None) -> None:
        if len(configs) != len(out_dirs):
            raise ValueError(f"{len(configs)} configs but {len(out_dirs)} output folders")
        check_ensemble_compatible(configs)
        # Stacked (K, …) weights are contiguous, so members compute NCHW (stored as channels_last=False).
        contiguous = [dataclasses.replace(c, channels_last=False) for c in configs]
        self.members = [Trainer(c, d, resume=resume, log=log) for c, d in zip(contiguous, out_dirs)]
        lead = self.members[0]
        self.lead, self.config, self.device, self.log = lead, lead.config, lead.device, lead.log
        if lead.dist.is_distributed:
            raise ValueError("ensembles train in one process; run them without torchrun")
        starts = {str(m.out_dir): m.start_epoch for m in self.members}
        if len(set(starts.values())) != 1:
            raise ValueError(f"--resume: ensemble members are at different epochs ({', '.join(f'{k} {v - 1}' for k, v in starts.items())}); "
                             "resume them separately")
        self.batches = _SharedEpochBatches(lead.batches)
        for m in self.members:
            m.batches = self.batches
        if any(c.channels_last for c in configs):
            self.log("ensembles compute in the contiguous memory format: channels_last is ignored")
        self._stack_state()
        self.compile_mode = lead.compile_mode
        self._graph: Any = None
        self._graph_failed = False

    # ------------------------------------------------------------ setup
    def _stack_state(self) -> None:
        """Stacked ``(K, …)`` tensors; the members' tensors become views of their rows."""
        ms = self.members
        models = [dict(m.model.named_parameters()) for m in ms]
        buffers = [dict(m.model.named_buffers()) for m in ms]
        self.params = {name: _bind_rows([d[name] for d in models]).requires_grad_() for name in models[0]}
        self.buffers = {name: _bind_rows([d[name] for d in buffers]) for name in buffers[0]}
        plist = list(self.params.values())
        for p in plist:
            p.grad = torch.zeros_like(p)
        self.optimizer = TensorLRSGD(plist, self.config.lr, self.config.momentum, self.config.weight_decay)
        self.optimizer.param_groups[0]["lr"] = self.lead.optimizer.param_groups[0]["lr"]  # one schedule: the lead's rate
        for name, p in self.params.items():
            bufs = [m.optimizer.state[d[name]]["momentum_buffer"] for m, d in zip(ms, models)]
            self.optimizer.state[p]["momentum_buffer"] = _bind_rows(bufs)
        self.loss = StackedLoss([m.loss_fn for m in ms])
        for k, m in enumerate(ms):
            m.loss_fn.weight.data = self.loss.weight[k]
        self.rho = _bind_rows([m.rho for m in ms])
        self.loss_sum = _bind_rows([m.state.loss_sum for m in ms])
        self.correct = _bind_rows([m.state.correct for m in ms])
        self._views = [t for m in ms for t in (*m.model.parameters(), *m.model.buffers(), m.loss_fn.weight, m.rho,
                                               m.state.loss_sum, m.state.correct)]
        self._views += [m.optimizer.state[p]["momentum_buffer"] for m in ms for p in m.params]
        # Per-member rows of the stacked gradients and parameters, for SAM's per-member norm.
        self._grad_rows = [[p.grad[k] for p in plist] for k in range(len(ms))]
        self._param_rows = [[p.detach()[k] for p in plist] for k in range(len(ms))]

    # --------------------------------------------------------- the step
    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, B, C)``: every member's network on the shared batch ``x``."""
        template = self.lead.model

        def one(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor]) -> torch.Tensor:
            return functional_call(template, (params, buffers), (x,))

        return vmap(one, in_dims=(0, 0), randomness="error")(self.params, self.buffers)

    def _loss_and_backward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lead = self.lead
        with torch.autocast(self.device.type, dtype=lead.autocast_dtype or torch.bfloat16, enabled=lead.autocast_dtype is not None, cache_enabled=False):
            logits = self._logits(x)
        losses = self.loss(logits.float(), y)
        # member k's loss depends on row k only: row k of each .grad is its gradient
        gradients_into([p.grad for p in self.params.values()], losses.sum(), list(self.params.values()))
        return losses.detach(), logits.detach()

    @torch.no_grad()
    def _sam_perturbation(self) -> list[list[torch.Tensor]]:
        """Per member k: ``e_k = ρ_k g_k / ‖g_k‖`` (ASAM: ``ρ_k T²g_k / ‖T g_k‖``, ``T = |w_k|``),
        norms over member k's parameters only (as :func:`~spectra.train.sam.sam_perturbation`)."""
        grads, params = self._grad_rows, self._param_rows
        if self.config.sam_adaptive:
            grads = [torch._foreach_mul(g, torch._foreach_abs(p)) for g, p in zip(grads, params)]
        flat = [t for rows in grads for t in rows]
        norms = torch.stack(torch._foreach_norm(flat)).view(len(grads), -1)  # (K, tensors)
        factor = self.rho / (torch.linalg.vector_norm(norms, dim=1) + 1e-12)
        out = []
        for k, (g, p) in enumerate(zip(grads, params)):
            if self.config.sam_adaptive:
                e = torch._foreach_mul(g, torch._foreach_abs(p))
                torch._foreach_mul_(e, factor[k])
            else:  # one multi-tensor op, as sam_perturbation
                e = torch._foreach_mul(g, factor[k])
            out.append(e)
        return out

    def _train_step(self) -> None:
        """One update of every member from the batch in the lead's ``state.x/y`` (graph-capturable)."""
        s = self.lead.state
        x, y = s.model_input(), s.y
        loss, logits = self._loss_and_backward(x, y)
        if self.config.optimizer == "sam":
            e = [t for rows in self._sam_perturbation() for t in rows]
            rows = [t for r in self._param_rows for t in r]
            with torch.no_grad():
                torch._foreach_add_(rows, e)
            with self.lead._bn_frozen(self.config.sam_bn == "freeze"):  # the template's BatchNorm modules
                self._loss_and_backward(x, y)
            with torch.no_grad():
                torch._foreach_sub_(rows, e)
        self.optimizer.step()
        with torch.no_grad():
            self.loss_sum.add_(loss)
            self.correct.add_((logits.argmax(-1) == y).sum(-1))

    def _snapshot(self) -> list[torch.Tensor]:
        tensors = [*self.params.values(), *self.buffers.values(), self.loss_sum, self.correct]
        return tensors + [self.optimizer.state[p]["momentum_buffer"] for p in self.params.values()]

    def _run_step(self) -> None:
        if self.compile_mode in ("graphs", "max") and not self._graph_failed:
            if self._graph is None:
                self._graph = capture_step_graph(self._train_step, self._snapshot(), self.log, owner=self)
                self._graph_failed = self._graph is None
                for m in self.members:  # their summaries report the mode actually used
                    m._graph_failed = self._graph_failed
            if self._graph is not None:
                self._graph.replay()
                return
        self._train_step()

    # --------------------------------------------------- epoch protocol
    @property
    def epoch(self) -> int:
        return self.lead.epoch

    @property
    def done(self) -> bool:
        return all(m.done for m in self.members)

    def begin(self) -> None:
        self._t_start = time.perf_counter()
        for m in self.members:
            m.begin()

    def start_train_epoch(self, epoch: int, max_steps: int | None = None) -> int:
        """Every member's epoch set-up (learning rate, DRW weights, accumulators); the batches are made once."""
        return min(m.start_train_epoch(epoch, max_steps) for m in self.members)

    def train_step(self, i: int) -> None:
        """Step ``i`` of the current epoch for every member (no host synchronisation)."""
        assert self.batches.current is not None, "start_train_epoch first"
        xs, ys = self.batches.current[1]
        self.lead.state.x.copy_(xs[i])
        self.lead.state.y.copy_(ys[i])
        self._run_step()

    def finish_train_epoch(self) -> list[dict[str, float]]:
        stats = [m.finish_train_epoch() for m in self.members]
        self.batches.release()
        return stats

    def train_epoch(self, epoch: int, max_steps: int | None = None) -> list[dict[str, float]]:
        """One epoch of all members (benchmarks); per-member statistics."""
        steps = self.start_train_epoch(epoch, max_steps)
        for i in range(steps):
            self.train_step(i)
        return self.finish_train_epoch()

    def prepare(self) -> None:
        for m in self.members:
            m.prepare()

    def end_epoch(self, stats: list[dict[str, float]]) -> None:
        """Each member evaluates, logs and checkpoints; all stop together at the first member's time limit."""
        now = time.perf_counter() - self._t_start
        over_time = any(m.config.time_limit_s is not None and now > m.config.time_limit_s for m in self.members)
        for m, s in zip(self.members, stats):
            m.end_epoch(s, over_time=over_time)

    def finish(self) -> list[FitResult]:
        results = [m.finish() for m in self.members]
        _unbind(self._views)
        return results


def fit_ensemble(configs: Sequence[TrainConfig], out_dirs: Sequence[str | Path], resume: bool = False,
                 log: Callable[[str], None] | None = None) -> list[FitResult]:
    """Train ``configs`` as one vectorised ensemble (one :class:`FitResult` per
    member, each what :func:`~spectra.train.fit` would produce up to float
    rounding). Members must be compatible (:func:`check_ensemble_compatible`)."""
    ensemble = Ensemble(configs, out_dirs, resume=resume, log=log)
    return run_in_lockstep([ensemble], ensemble.device)[0]


def fit_ensembles(configs: Sequence[TrainConfig], out_dirs: Sequence[str | Path], resume: bool = False,
                  log: Callable[[str], None] | None = None) -> list[FitResult]:
    """Train ``configs`` grouped by :func:`group_for_ensembles`: each group of
    two or more as one vectorised ensemble, the rest as single runs, all groups
    in lockstep on their own CUDA streams. Results in the order of ``configs``."""
    groups = group_for_ensembles(configs)
    runners: list[Any] = [Ensemble([configs[i] for i in g], [out_dirs[i] for i in g], resume=resume, log=log) if len(g) > 1
                          else Trainer(configs[g[0]], out_dirs[g[0]], resume=resume, log=log) for g in groups]
    devices = {r.device for r in runners}
    if len(devices) != 1:
        raise ValueError(f"fit_ensembles needs one device; got {sorted(map(str, devices))}")
    finished = run_in_lockstep(runners, next(iter(devices)))
    results: dict[int, FitResult] = {}
    for g, out in zip(groups, finished):
        for i, r in zip(g, out if isinstance(out, list) else [out]):
            results[i] = r
    return [results[i] for i in range(len(configs))]
