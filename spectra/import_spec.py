"""Resolve ``package.module:attr`` specs to callables (user architectures, data-set factories)."""
from __future__ import annotations

import importlib
import os
import sys
from typing import Any, Callable


def import_callable(spec: str, what: str = "object", expected: str = "package.module:Attr") -> Callable[..., Any]:
    """The callable named by ``spec`` = ``"package.module:attr[.sub]"``.

    The module is searched on ``sys.path`` and, like ``python -m`` does, in the
    current directory (an installed console script does not put it on the
    path). Every failure is a ``ValueError`` with one line naming ``what`` was
    asked for.
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"bad {what} spec {spec!r}; expected '{expected}'")
    cwd = os.getcwd()
    if cwd not in sys.path and "" not in sys.path:
        sys.path.append(cwd)  # after installed packages: a local file never shadows them
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r} for {what} {spec!r}: {exc} "
                         f"(searched the current directory and PYTHONPATH)") from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"{spec!r} is not callable")
    return obj
