"""benchmarks/gpu_session.sh runs only on lent GPU machines, where a typo costs device minutes:
check here that it parses and that every documented PART has its function."""
import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_session.sh"


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_script_parses():
    result = subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_documented_part_has_a_function():
    text = SCRIPT.read_text()
    documented = set(re.findall(r"^#\s+PART=(\w+)\s", text, flags=re.M))
    defined = set(re.findall(r"^part_(\w+)\(\)", text, flags=re.M))
    assert {"eigs", "table", "gpucheck", "figure"} <= documented
    assert documented <= defined, f"documented but not defined: {sorted(documented - defined)}"
