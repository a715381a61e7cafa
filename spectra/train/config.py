"""Training configuration and the method presets of the paper's CIFAR table.

A :class:`TrainConfig` is a flat, JSON-able record of every hyper-parameter.
:func:`resolve_config` starts from the defaults (the LDAM-DRW / Saddle-LongTail
CIFAR recipe), applies the method preset, then the user's overrides, so any
hyper-parameter of any preset can be changed.

Schedule milestones left at ``None`` scale with ``epochs``: learning-rate
decays at 80 % and 90 % of training and DRW at 80 % (160, 180 and 160 for the
reference 200 epochs), so short runs keep the shape of the recipe.
"""
from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

__all__ = ["TrainConfig", "METHODS", "METHOD_DESCRIPTIONS", "PRESET_KEYS", "resolve_config", "parse_override"]


@dataclass
class TrainConfig:
    """Every setting of a training run (JSON-able; stored in each checkpoint)."""

    # what to train
    method: str = "ce"
    dataset: str = "cifar10-lt"
    data_root: str | None = None
    imbalance_ratio: float = 100.0
    imbalance_profile: str = "exp"
    data_seed: int = 0
    max_train_samples: int | None = None  # keep the first N (LT, class-major) samples: tests, dry runs
    max_test_samples: int | None = None
    arch: str = "resnet32"
    cosine_head: bool = False
    # loss
    loss: str = "ce"  # ce | ldam | vs
    ldam_max_margin: float = 0.5
    ldam_scale: float = 30.0
    vs_gamma: float = 0.3
    vs_tau: float = 1.0
    drw: bool = False  # class re-weighting by effective number, switched on at drw_epoch
    drw_epoch: int | None = None  # 0-indexed epoch at which weights switch on (None: 80 % of epochs)
    drw_beta: float = 0.9999
    # optimisation
    epochs: int = 200
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 2e-4
    warmup_epochs: int = 5
    lr_milestones: list[int] | None = None  # 1-indexed: lr × factor[i] once epoch > milestone[i]
    lr_factors: list[float] = field(default_factory=lambda: [0.01, 0.0001])
    last_batch: str = "wrap"  # wrap: complete the last batch from the epoch's start; drop: skip it; short: as the reference
    # SAM (w_adv = w + rho · g/||g||; adaptive: ASAM, T = |w|)
    optimizer: str = "sgd"  # sgd | sam | pgd | lpf
    rho: float = 0.05
    sam_adaptive: bool = False
    sam_bn: str = "update"  # update: BN statistics updated in both passes (reference); freeze: first pass only
    # PGD (Jin et al. 2017): w += r · z/||z|| when ||g|| <= threshold and >= interval steps since the last.
    # At most one perturbation per 100 steps: at lr <= 1e-3 nothing pulls them back, and every step's
    # would add up to a jump of norm ~22 in the last 20 epochs (-5 points, tail -13; docs/training.md)
    pgd_radius: float = 0.5
    pgd_grad_threshold: float | None = None  # None: no gradient test (mini-batch gradients never vanish)
    pgd_interval: int = 100
    # LPF-SGD (Bisla et al. 2022, as their code): the batch split into M parts, part m's gradient at w + eps_m,
    # eps ~ N(0, (sigma·||row||)^2) per filter row (per tensor for vectors); their CIFAR setting M 1, sigma 0.002
    lpf_samples: int = 1
    lpf_sigma: float = 2e-3
    # run control
    seed: int = 0
    device: str = "auto"
    compile: str = "auto"  # off | graphs | inductor | max | auto (graphs on CUDA, off on CPU)
    amp: str = "off"  # off | bf16
    channels_last: bool | None = None  # None: on for CPUs (measured 1.3x faster for ResNet-32), off on CUDA
    sync_bn: bool = False  # under torchrun on GPUs: SyncBatchNorm (batch statistics of the global batch)
    eval_every: int = 1
    eval_batch_size: int = 1000
    save_every: int = 10
    snapshot_optimizer: bool = True  # False: ckpt_epochNNNN.pt without optimizer state (half the size); last.pt keeps it
    tail_fraction: float = 0.3  # "tail" = the rarest 30 % of classes (C10-LT: 3 classes, C100-LT: the 30 few-shot ones)
    spectra_every: int = 0  # 0: off; N: per-class lambda_max / lambda_min every N epochs
    spectra_samples_per_class: int = 500
    spectra_batch_size: int = 250
    spectra_max_iter: int = 100  # Lanczos products per class and end (tolerance 1e-3 relative residual)
    time_limit_s: float | None = None  # stop cleanly (checkpoint + summary) after the epoch that passes it
    progress: bool = True

    # ------------------------------------------------------------------
    def resolved_lr_milestones(self) -> list[int]:
        if self.lr_milestones is not None:
            return [int(m) for m in self.lr_milestones]
        return [round(0.8 * self.epochs), round(0.9 * self.epochs)]

    def resolved_drw_epoch(self) -> int:
        return int(self.drw_epoch) if self.drw_epoch is not None else round(0.8 * self.epochs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training setting(s): {', '.join(sorted(unknown))}")
        return cls(**d)

    def validate(self, new_run: bool = True) -> None:
        """Raise ``ValueError`` with a one-line message on an impossible setting:
        a value of the wrong type, a non-finite number, one out of its range, or
        (``new_run``) settings that would silently do nothing together
        (:meth:`_check_combinations`). Resuming skips the latter, so that a run
        made before such a check was added still resumes."""
        hints = _field_types()
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), hints[f.name])
        choices = {
            "loss": ("ce", "ldam", "vs"),
            "optimizer": ("sgd", "sam", "pgd", "lpf"),
            "sam_bn": ("update", "freeze"),
            "compile": ("off", "graphs", "inductor", "max", "auto"),
            "amp": ("off", "bf16"),
            "last_batch": ("wrap", "drop", "short"),
            "imbalance_profile": ("exp", "step"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {getattr(self, name)!r}")
        for name, (low, low_open, high, high_open) in _RANGES.items():
            value = getattr(self, name)
            if value is None:  # only nullable fields reach here with None (types checked above)
                continue
            for item in value if isinstance(value, list) else [value]:
                _check_range(name, item, low, low_open, high, high_open)
        milestones = self.resolved_lr_milestones()
        if len(self.lr_factors) != len(milestones):
            raise ValueError("lr_factors and lr_milestones must have the same length")
        if milestones != sorted(milestones):  # the last milestone passed sets the rate: out of order, one is skipped
            raise ValueError(f"lr_milestones must be in increasing order; got {milestones}")
        if self.optimizer == "lpf" and self.batch_size % self.lpf_samples:
            raise ValueError(f"lpf_samples ({self.lpf_samples}) must divide the batch size ({self.batch_size}): "
                             "LPF-SGD splits each batch into that many equal parts")
        if new_run:
            self._check_combinations()

    def _check_combinations(self) -> None:
        """Settings that are valid alone but would silently do nothing together:

        * DRW with an explicit ``drw_epoch >= epochs`` (the weights switch on
          after ``drw_epoch`` completed epochs, i.e. never). The default
          (``None``: 80 % of ``epochs``) is allowed, so 1- and 2-epoch checks of
          a DRW preset keep the recipe's shape: no re-weighting yet.
        * An explicit learning-rate milestone whose decay never applies: the
          rate drops for epochs after both the milestone and the warm-up, so
          ``max(milestone, warmup_epochs) >= epochs`` means never; and an
          explicit warm-up longer than the run other than the default 5 epochs
          (kept for short checks).
        * An imbalance ratio or profile on a balanced data set (they shape the
          ``-lt`` train split only): a value other than the default (or ratio 1).
        """
        if self.drw and self.drw_epoch is not None and self.drw_epoch >= self.epochs:
            raise ValueError(f"drw_epoch {self.drw_epoch} >= epochs {self.epochs}: DRW would never switch on "
                             f"(it starts after drw_epoch completed epochs); use drw_epoch < {self.epochs}")
        late = [m for m in self.lr_milestones or [] if m >= self.epochs]
        if late:
            raise ValueError(f"lr_milestones {', '.join(map(str, late))} >= epochs {self.epochs}: that decay would never "
                             f"happen (the rate drops after the milestone epoch); use milestones < {self.epochs}")
        if self.lr_milestones and self.warmup_epochs >= self.epochs:
            raise ValueError(f"lr_milestones {', '.join(map(str, self.lr_milestones))} never apply: the warm-up "
                             f"(warmup_epochs {self.warmup_epochs}) lasts the whole run (epochs {self.epochs}); "
                             f"use warmup_epochs < {self.epochs}")
        if self.warmup_epochs > self.epochs and self.warmup_epochs != _DEFAULTS.warmup_epochs:
            raise ValueError(f"warmup_epochs {self.warmup_epochs} > epochs {self.epochs}: the run would end inside "
                             f"its warm-up, never at the base learning rate; use warmup_epochs <= {self.epochs}")
        if not self.dataset.endswith("-lt"):
            if self.imbalance_ratio not in (1.0, _DEFAULTS.imbalance_ratio):
                raise ValueError(f"imbalance_ratio {self.imbalance_ratio:g} applies to the -lt data sets only "
                                 f"(cifar10-lt, cifar100-lt); {self.dataset} is balanced")
            if self.imbalance_profile != _DEFAULTS.imbalance_profile:
                raise ValueError(f"imbalance_profile {self.imbalance_profile!r} applies to the -lt data sets only "
                                 f"(cifar10-lt, cifar100-lt); {self.dataset} is balanced")


_DEFAULTS = TrainConfig()

# Allowed ranges: name -> (low, low excluded, high, high excluded); None = unbounded.
# Lists (lr_milestones, lr_factors) are checked element-wise; None values are skipped.
_RANGES: dict[str, tuple[float | None, bool, float | None, bool]] = {
    **{name: (1, False, None, False) for name in (
        "epochs", "batch_size", "eval_every", "eval_batch_size", "save_every", "lpf_samples", "pgd_interval",
        "max_train_samples", "max_test_samples", "spectra_samples_per_class", "spectra_batch_size",
        "spectra_max_iter", "imbalance_ratio")},
    # Seeds: numpy's legacy seeding (the long-tail selection) takes [0, 2**32); the per-epoch generators' seeds
    # (seed · 1000003 + epoch) · 7 + stream must fit in int64.
    **{name: (0, False, 2 ** 32, True) for name in ("data_seed", "seed")},
    **{name: (0, False, None, False) for name in (
        "warmup_epochs", "drw_epoch", "lr_milestones", "lr_factors", "weight_decay", "rho",
        "pgd_radius", "pgd_grad_threshold", "lpf_sigma", "spectra_every", "vs_gamma", "vs_tau")},
    **{name: (0, True, None, False) for name in ("lr", "time_limit_s", "ldam_max_margin", "ldam_scale")},
    "momentum": (0, False, 1, True),
    "drw_beta": (0, False, 1, True),
    "tail_fraction": (0, True, 1, False),
}


def _check_range(name: str, value: float, low: float | None, low_open: bool, high: float | None,
                 high_open: bool) -> None:
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        parts = []
        if low is not None:
            parts.append(f"{'>' if low_open else '>='} {low}")
        if high is not None:
            parts.append(f"{'<' if high_open else '<='} {high}")
        raise ValueError(f"{name} must be {' and '.join(parts)}; got {value}")


# Per-method settings on top of the defaults. "rho" is per data-set family
# (CIFAR-10 / CIFAR-100), from the reference run.sh. VS + SAM's rho is not
# given by the authors: 0.3, the largest that left the class-prior plateau in
# a measurement (ResNet-32 on CIFAR-10-LT; docs/training.md: with 0.5 the VS
# loss stays at H(prior) for 8+ epochs, on the CPU and on an H200).
METHODS: dict[str, dict[str, Any]] = {
    "ce": {},
    "ce-sam": {"optimizer": "sam", "rho": {"cifar10": 0.1, "cifar100": 0.2}},
    "ce-drw": {"drw": True},
    "ce-drw-sam": {"drw": True, "optimizer": "sam", "rho": {"cifar10": 0.5, "cifar100": 0.8}},
    "ldam-drw": {"loss": "ldam", "cosine_head": True, "drw": True},
    "ldam-drw-sam": {"loss": "ldam", "cosine_head": True, "drw": True, "optimizer": "sam", "rho": {"cifar10": 0.8, "cifar100": 0.8}},
    "vs": {"loss": "vs"},
    "vs-sam": {"loss": "vs", "optimizer": "sam", "rho": {"cifar10": 0.3, "cifar100": 0.3}},
    "ce-drw-pgd": {"drw": True, "optimizer": "pgd"},
    "ce-drw-lpf": {"drw": True, "optimizer": "lpf"},
}

METHOD_DESCRIPTIONS = {
    "ce": "cross-entropy, SGD",
    "ce-sam": "cross-entropy, SAM",
    "ce-drw": "cross-entropy, deferred re-weighting (DRW), SGD",
    "ce-drw-sam": "cross-entropy, DRW, SAM",
    "ldam-drw": "LDAM loss with cosine head, DRW, SGD",
    "ldam-drw-sam": "LDAM loss with cosine head, DRW, SAM",
    "vs": "vector-scaling loss, SGD",
    "vs-sam": "vector-scaling loss, SAM",
    "ce-drw-pgd": "cross-entropy, DRW, perturbed gradient descent",
    "ce-drw-lpf": "cross-entropy, DRW, low-pass-filter SGD",
}


def _family(dataset: str) -> str:
    return "cifar100" if dataset.startswith("cifar100") else "cifar10"


def resolve_config(method: str, dataset: str = "cifar10-lt", new_run: bool = True, **overrides: Any) -> TrainConfig:
    """Defaults ← method preset ← ``overrides``; validated (``new_run=False`` for
    the config of a run to resume: :meth:`TrainConfig.validate`).

    >>> resolve_config("ce-drw-sam").rho
    0.5
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    preset = sorted(set(overrides) & set(PRESET_KEYS))
    if preset:
        raise ValueError(f"{', '.join(preset)} chooses the preset: pass it as resolve_config's own argument, not as a setting")
    values: dict[str, Any] = {"method": method, "dataset": dataset}
    for key, value in METHODS[method].items():
        values[key] = value[_family(dataset)] if isinstance(value, dict) else value
    values.update({k: v for k, v in overrides.items() if v is not None or k in _NULLABLE_OVERRIDES})
    config = TrainConfig.from_dict(values)
    config.validate(new_run)
    return config


# Settings that act only under one optimizer, loss or DRW: setting -> (what they need, test on the config).
_USED_ONLY_WITH: dict[str, tuple[str, Callable[[TrainConfig], bool]]] = {
    **{k: ("optimizer sam", lambda c: c.optimizer == "sam") for k in ("rho", "sam_adaptive", "sam_bn")},
    **{k: ("optimizer pgd", lambda c: c.optimizer == "pgd") for k in ("pgd_radius", "pgd_grad_threshold", "pgd_interval")},
    **{k: ("optimizer lpf", lambda c: c.optimizer == "lpf") for k in ("lpf_samples", "lpf_sigma")},
    **{k: ("loss ldam", lambda c: c.loss == "ldam") for k in ("ldam_max_margin", "ldam_scale")},
    **{k: ("loss vs", lambda c: c.loss == "vs") for k in ("vs_gamma", "vs_tau")},
    **{k: ("DRW (drw=true)", lambda c: c.drw) for k in ("drw_epoch", "drw_beta")},
}


def settings_without_effect(config: TrainConfig, keys: Iterable[str]) -> dict[str, str]:
    """Of ``keys``, the settings that change nothing under ``config`` -> what they need
    (``rho`` without SAM, ``vs_tau`` without the VS loss, ...): a user who sets them
    explicitly would believe a run used them."""
    return {k: _USED_ONLY_WITH[k][0] for k in keys if k in _USED_ONLY_WITH and not _USED_ONLY_WITH[k][1](config)}


# Settings whose None is meaningful, so an explicit None override is kept.
_NULLABLE_OVERRIDES = {"pgd_grad_threshold", "time_limit_s", "lr_milestones", "drw_epoch"}


def parse_override(text: str) -> tuple[str, Any]:
    """``"key=value"`` → ``(key, value)``, the value parsed by the type of the
    setting: numbers as numbers (finite only), ``true``/``false`` for flags,
    lists as JSON lists (``[100,150]``), ``null``/``none`` for settings that
    may be None, anything else as a string. Raises ``ValueError`` (one line,
    naming the key) on an unknown key or a value of the wrong type."""
    key, sep, raw = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key:
        raise ValueError(f"bad override {text!r}; expected key=value")
    if key not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise ValueError(f"unknown training setting {key!r} in {text!r}")
    if key in PRESET_KEYS:
        raise ValueError(f"--set {key}=...: {key} chooses the preset; set it with --{key}, not --set")
    try:
        value = _parse_value(raw.strip(), _field_types()[key])
        _check_type(key, value, _field_types()[key])
    except ValueError as exc:
        raise ValueError(f"--set {key}={raw}: {exc}") from None
    return key, value


# Settings that resolve_config takes as its own arguments (they choose the preset).
PRESET_KEYS = ("method", "dataset")


def _field_types() -> dict[str, Any]:
    """Field name → its type (``int``, ``float | None``, ``list[int] | None``, ...)."""
    return typing.get_type_hints(TrainConfig)


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` → ``(X, True)``; ``X`` → ``(X, False)``."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], len(args) < len(typing.get_args(tp))
    return tp, False


def _type_name(tp: Any) -> str:
    base, nullable = _split_optional(tp)
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if typing.get_origin(base) is list:
        text = f"a list of {names[typing.get_args(base)[0]].split(' ', 1)[1]}s, e.g. [1,2]"
    else:
        text = names.get(base, str(base))
    return text + (" or null" if nullable else "")


def _parse_value(raw: str, tp: Any) -> Any:
    """The text of ``--set key=raw`` as a value of type ``tp`` (see :func:`parse_override`)."""
    base, nullable = _split_optional(tp)
    if nullable and raw.lower() in ("null", "none"):
        return None
    if base is str:
        return raw
    if base is bool:
        if raw.lower() in ("true", "1", "yes", "on"):
            return True
        if raw.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"expected {_type_name(tp)}")
    if typing.get_origin(base) is list:
        try:
            items = json.loads(raw)
        except json.JSONDecodeError:
            raise ValueError(f"expected {_type_name(tp)}") from None
        if not isinstance(items, list):
            raise ValueError(f"expected {_type_name(tp)}")
        element = typing.get_args(base)[0]
        return [_parse_value(str(item), element) if not isinstance(item, (int, float)) or isinstance(item, bool)
                else _number(item, element, tp) for item in items]
    try:
        number = float(raw) if base is float else int(raw)
    except ValueError:
        raise ValueError(f"expected {_type_name(tp)}") from None
    return _number(number, base, tp)


def _number(value: float, element: Any, tp: Any) -> float | int:
    if element is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"expected {_type_name(tp)}")
        return int(value)
    return float(value)


def _check_type(name: str, value: Any, tp: Any) -> None:
    """``ValueError`` unless ``value`` has type ``tp``; floats must be finite."""
    base, nullable = _split_optional(tp)
    if value is None:
        if not nullable:
            raise ValueError(f"{name} must be {_type_name(tp)}; got None")
        return
    elements = value if typing.get_origin(base) is list else [value]
    if typing.get_origin(base) is list:
        if not isinstance(value, list):
            raise ValueError(f"{name} must be {_type_name(tp)}; got {value!r}")
        base = typing.get_args(base)[0]
    for item in elements:
        if base is float:
            ok = isinstance(item, (int, float)) and not isinstance(item, bool)
            if ok and not math.isfinite(item):
                raise ValueError(f"{name} must be a finite number; got {item}")
        elif base is int:
            ok = isinstance(item, int) and not isinstance(item, bool)
        else:
            ok = isinstance(item, base)
        if not ok:
            raise ValueError(f"{name} must be {_type_name(tp)}; got {item!r}")
