r"""A CIFAR-10 copy passed through JPEG once more, to measure what JPEG costs at full scale.

The only full CIFAR-10 here is the project's JPEG copy (quality ≈ 75, 4:2:0), and
the table of REPRODUCTION.md, trained on it, is 3.7–8.5 points below the paper.
The originals of the full set are not here, so the cost of that first JPEG pass
cannot be measured directly at full scale. What can: the cost of a *further*
pass. This script writes ``OUT/cifar-10-batches-py`` with every training and
test image of ``--data-root`` re-encoded by Pillow at ``--quality`` (4:2:0),
in the same order (so the long-tailed selection is the same images), and prints
the mean absolute pixel change. Training CE on the copy and on ``--data-root``
(``PART=jpeg`` of ``benchmarks/gpu_session.sh``) then says how much accuracy one
more lossy pass costs in the table's own setting: near zero makes JPEG an
unlikely cause of the gap, several points a likely one.

    python benchmarks/jpeg_reencode.py --data-root DIR --quality 50 --out DIR_q50
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # spectra from this checkout
from jpeg_effect import jpeg_roundtrip, write_batches  # noqa: E402


def reencode(data_root: str | Path, quality: int, out: str | Path) -> dict:
    """Write the re-encoded copy; returns the mean absolute pixel change per split."""
    from spectra.datasets import read_cifar

    facts: dict = {"source": str(data_root), "quality": quality, "subsampling": "4:2:0"}
    splits = {}
    for split in ("train", "test"):
        x, y, _ = read_cifar(data_root, "cifar10", split)
        xq = jpeg_roundtrip(x, quality)
        splits[split] = (xq, y)
        facts[f"{split}_images"] = len(y)
        facts[f"{split}_mean_abs_change"] = float(np.abs(xq.astype(np.int16) - x.astype(np.int16)).mean())
    write_batches(Path(out) / "cifar-10-batches-py", *splits["train"], *splits["test"])
    return facts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", required=True, help="folder with cifar-10-batches-py")
    p.add_argument("--quality", type=int, required=True, help="JPEG quality, 1..95")
    p.add_argument("--out", required=True, help="folder for the re-encoded cifar-10-batches-py")
    args = p.parse_args()
    if not 1 <= args.quality <= 95:
        p.error(f"--quality must be in 1..95 (Pillow's useful range), got {args.quality}")
    if (Path(args.out) / "cifar-10-batches-py").exists():
        p.error(f"{args.out}/cifar-10-batches-py exists; choose another --out")
    try:
        facts = reencode(args.data_root, args.quality, args.out)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(str(exc).splitlines()[0]) from None
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
