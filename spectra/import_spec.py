"""Resolve ``package.module:attr`` specs to callables (user architectures, data-set factories)."""
from __future__ import annotations

import importlib
from typing import Any, Callable


def import_callable(spec: str, what: str = "object", expected: str = "package.module:Attr") -> Callable[..., Any]:
    """The callable named by ``spec`` = ``"package.module:attr[.sub]"``.

    Every failure is a ``ValueError`` with one line naming ``what`` was asked for.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"bad {what} spec {spec!r}; expected '{expected}'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {what} {spec!r}: {exc}") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj
