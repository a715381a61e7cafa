"""argparse types shared by the benchmark scripts."""
from __future__ import annotations

import argparse
import math
from typing import Any, Callable


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` (int or float) that is > 0."""
    return _bounded(kind, allow_zero=False)


def non_negative(kind: type) -> Callable[[str], Any]:
    """An argparse type: a finite number of ``kind`` that is >= 0."""
    return _bounded(kind, allow_zero=True)


def _bounded(kind: type, allow_zero: bool) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not (math.isfinite(value) and (value >= 0 if allow_zero else value > 0)):
            raise argparse.ArgumentTypeError(f"must be a finite number {'>=' if allow_zero else '>'} 0, got {text}")
        return value
    return parse
