"""A short real training run on tiny CIFAR-format files, for the tests of scripts that read its checkpoints."""
from pathlib import Path

from cifar_format_fixture import write_cifar10
from spectra.train import fit, resolve_config


def trained_run(tmp_path_factory, method: str, epochs: int = 1) -> tuple[Path, Path]:
    """``(data root, last.pt)`` of ``method`` on a ratio-10 long-tailed tiny set, ResNet-8, batch 32."""
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=12, test_per_class=4)
    cfg = resolve_config(method, data_root=str(root), epochs=epochs, batch_size=32, eval_batch_size=64, progress=False,
                         imbalance_ratio=10.0, arch="resnet8")
    out = tmp_path_factory.mktemp("run")
    fit(cfg, out, log=lambda m: None)
    return root, out / "last.pt"
