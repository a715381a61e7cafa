"""benchmarks/train_speed.py: on a CPU it times both memory formats, and each row names the one it ran."""
import subprocess
import sys

from benchmark_scripts import BENCHMARKS


def run(*args: str) -> str:
    cmd = [sys.executable, str(BENCHMARKS / "train_speed.py"), "--device", "cpu", "--arch", "resnet8", "--method", "ce",
           "--steps", "1", "--epochs", "1", "--max-train-samples", "300", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_cpu_default_times_nchw_and_nhwc():
    rows = [line for line in run().splitlines() if line.startswith("off, ")]
    assert [r.split()[1] for r in rows] == ["NCHW", "NHWC"]
    assert all(float(r.split()[2]) > 0 for r in rows)  # s/epoch


def test_one_memory_format_on_request():
    assert [line.split()[1] for line in run("--no-channels-last").splitlines() if line.startswith("off, ")] == ["NCHW"]
