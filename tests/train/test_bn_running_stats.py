"""benchmarks/bn_running_stats.py: no batches reproduces the stored accuracy; batches change the statistics."""
import pytest
import torch

from benchmark_scripts import load_script
from tiny_training import trained_run
from spectra.train import load_training_checkpoint, model_from_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return trained_run(tmp_path_factory, "ce-sam")


@pytest.fixture(scope="module")
def script():
    return load_script("bn_running_stats")


def test_zero_batches_reproduce_the_stored_accuracy(run, script):
    root, ckpt = run
    stored, accs = script.restat_accuracies(str(ckpt), str(root), batches=0, draws=2)
    assert accs == [pytest.approx(stored["acc"], abs=1e-9)] * 2


def test_reestimating_changes_only_the_running_statistics(run, script):
    root, ckpt = run
    model = model_from_checkpoint(load_training_checkpoint(ckpt))
    batches = torch.randint(0, 256, (2, 8, 3, 32, 32), dtype=torch.uint8)
    fresh = script.reestimate_statistics(model, batches)
    before, after = model.state_dict(), fresh.state_dict()
    stats = [k for k in before if k.endswith(("running_mean", "running_var"))]
    assert stats and all(not torch.equal(before[k], after[k]) for k in stats)
    assert all(torch.equal(before[k], after[k]) for k in before if k not in stats and not k.endswith("num_batches_tracked"))
    assert torch.equal(script.reestimate_statistics(model, batches[:0]).state_dict()["bn1.running_mean"], before["bn1.running_mean"])
