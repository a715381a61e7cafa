"""spectra.train.checkpoint: unreadable checkpoints are one-line ValueErrors
naming the file; atomically written files get the umask's permissions."""
import os
import stat
import zipfile

import pytest
import torch

from spectra.train.checkpoint import atomic_torch_save, atomic_write_bytes, atomic_write_json, load_training_checkpoint


@pytest.mark.parametrize("content", [b"garbage\n", b"", "truncated zip"])
def test_an_unreadable_checkpoint_is_a_value_error_naming_it(tmp_path, content):
    path = tmp_path / "last.pt"
    if content == "truncated zip":
        torch.save({"format": "spectra-checkpoint", "w": torch.zeros(1000)}, path)
        path.write_bytes(path.read_bytes()[:600])
    else:
        path.write_bytes(content)
    with pytest.raises(ValueError) as err:
        load_training_checkpoint(path)
    assert str(err.value) == f"{path} is not a readable spectra training checkpoint (corrupt?)"
    assert err.value.__cause__ is None and err.value.__suppress_context__  # no weights_only=False advice below it


def test_a_foreign_but_readable_file_is_named_and_a_missing_one_is_an_os_error(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="other.pt is not a spectra training checkpoint"):
        load_training_checkpoint(tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError):
        load_training_checkpoint(tmp_path / "missing.pt")


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_writes_get_the_umask_permissions(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write_bytes(tmp_path / "a.bin", b"x")
        atomic_write_json(tmp_path / "b.json", {"a": 1})
        atomic_torch_save(tmp_path / "c.pt", {"t": torch.zeros(1)})
        with open(tmp_path / "plain", "w"):  # what open() gives under this umask
            pass
    finally:
        os.umask(old)
    expected = stat.S_IMODE((tmp_path / "plain").stat().st_mode)
    assert expected == 0o666 & ~umask
    for name in ("a.bin", "b.json", "c.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == expected, name
    assert zipfile.is_zipfile(tmp_path / "c.pt") and sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.json", "c.pt", "plain"]
