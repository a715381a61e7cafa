"""benchmarks/arguments.py: the number types of the benchmark scripts' options."""
import argparse

import pytest

from benchmark_scripts import load_script


@pytest.fixture(scope="module")
def arguments():
    return load_script("arguments")


def test_positive_and_non_negative_bounds(arguments):
    assert arguments.positive(int)("3") == 3 and arguments.positive(float)("0.5") == 0.5
    assert arguments.non_negative(int)("0") == 0
    for text in ("0", "-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            arguments.positive(float)(text)
    with pytest.raises(argparse.ArgumentTypeError, match="expected a int"):
        arguments.positive(int)("1.5")
    with pytest.raises(argparse.ArgumentTypeError, match=">= 0"):
        arguments.non_negative(int)("-2")
