"""The run folder's files: which count as a run, and logs cut back on resume."""
import json
import os

import pytest

from spectra.train.run_folder import check_out_dir_is_free, existing_run_files, jsonl_records, truncate_logs


def test_run_files_are_checkpoints_logs_and_summary_only(tmp_path):
    for name in ("ckpt_epoch0010.pt", "last.pt", "metrics.jsonl", "config.json", "results.h5", "notes.pt"):
        (tmp_path / name).write_text("x")
    assert existing_run_files(tmp_path) == ["ckpt_epoch0010.pt", "last.pt", "metrics.jsonl"]
    assert existing_run_files(tmp_path / "absent") == []
    with pytest.raises(ValueError, match=r"already holds a run \(ckpt_epoch0010.pt, last.pt, metrics.jsonl\); pass --resume"):
        check_out_dir_is_free(tmp_path)
    check_out_dir_is_free(tmp_path / "absent")


def test_truncate_logs_keeps_lines_up_to_the_epoch_and_drops_a_torn_tail(tmp_path):
    lines = [json.dumps({"epoch": e, "acc": e / 10}) for e in (1, 2, 3)]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(lines) + "\n" + '{"epoch": 4, "ac')  # a write cut short by a kill
    spectra_log = tmp_path / "spectra.jsonl"
    spectra_log.write_text(lines[0] + "\n")
    before = os.stat(spectra_log).st_ino
    truncate_logs(tmp_path, 2)
    assert metrics.read_text() == lines[0] + "\n" + lines[1] + "\n"
    assert os.stat(spectra_log).st_ino == before  # nothing to drop: the file is not rewritten


def test_a_bad_line_that_is_not_the_torn_tail_is_named(tmp_path):
    path = tmp_path / "metrics.jsonl"
    text = '{"epoch": 1}\nnot json\n{"epoch": 3}\n'
    with pytest.raises(ValueError, match=rf"^{path} line 2 is not a JSON record"):
        jsonl_records(path, text)
    with pytest.raises(ValueError, match="line 1 is not a JSON object"):
        jsonl_records(path, "[1, 2]\n")
