"""``package.module:attr`` specs for user architectures and data-set factories."""
import sys

import pytest

from spectra.import_spec import import_callable


def test_a_module_in_the_current_directory_is_found(tmp_path, monkeypatch):
    """Installed console scripts do not put the working directory on sys.path; specs still find it."""
    (tmp_path / "spectra_cwd_factory.py").write_text("def make():\n    return 42\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert import_callable("spectra_cwd_factory:make")() == 42
    assert sys.path[-1] == str(tmp_path)  # appended: never shadows installed packages


def test_bad_specs_give_one_line_errors(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="expected 'package.module:Attr'"):
        import_callable("no_colon")
    with pytest.raises(ValueError, match="cannot import 'spectra_no_such_module'.*current directory and PYTHONPATH"):
        import_callable("spectra_no_such_module:f")
    with pytest.raises(ValueError, match="has no attribute 'nope'"):
        import_callable("json:nope")
    with pytest.raises(ValueError, match="is not callable"):
        import_callable("json:__doc__")
