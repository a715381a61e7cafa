"""Progress bars for long computations, always on stderr."""
from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it",
                 enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr; a disabled bar (all methods no-ops) when not ``enabled``."""
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, leave=False, **kwargs)
