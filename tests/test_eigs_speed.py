"""Helpers of benchmarks/eigs_speed.py: which setting the all-classes run uses, and the reused reference."""
import argparse
import json

import pytest

from benchmark_scripts import load_script

eigs_speed = load_script("eigs_speed")


def _result(**runs):
    """{variant: {"spectra": {"blockB": run}}} from keyword ``variant_blockB=(seconds, hvps, converged)``."""
    out = {}
    for key, (seconds, hvps, converged) in runs.items():
        variant, block = key.rsplit("_", 1)
        out.setdefault(variant, {"spectra": {}})["spectra"][block] = {"seconds": seconds, "hvps": hvps,
                                                                       "converged": converged}
    return out


def test_best_setting_prefers_fewer_products_among_near_ties():
    # the H200 run: block 4 won class 3 by 1 % with twice the products, then lost the all-classes run
    tie = _result(eager_block1=(14.6, 37, True), eager_block4=(8.97, 78, True),
                  graphs_block1=(7.07, 37, True), graphs_block4=(7.01, 78, True), graphs_block8=(8.82, 114, True))
    assert eigs_speed.best_setting(tie, ["eager", "graphs"]) == ("graphs", "block1")
    clear = _result(graphs_block1=(9.0, 37, True), graphs_block4=(5.0, 78, True))  # a real win stays a win
    assert eigs_speed.best_setting(clear, ["graphs"]) == ("graphs", "block4")
    unconverged = _result(graphs_block1=(1.0, 20, False), graphs_block4=(5.0, 78, True))
    assert eigs_speed.best_setting(unconverged, ["graphs"]) == ("graphs", "block4")


def test_reference_json_is_refused_for_another_checkpoint_or_class(tmp_path):
    earlier = {"checkpoint": "a.pt", "arch": "resnet32",
               "compare": {"class": 3, "samples": 1077, "reference": {"lambda_max": 59.7, "lambda_min": -1.35}}}
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(earlier))
    args = argparse.Namespace(checkpoint="a.pt", arch="resnet32", compare_class=3)
    ref = eigs_speed.reference_from(str(path), args, 1077)
    assert ref["lambda_max"] == 59.7 and ref["from"] == str(path)
    for changed, samples in ((dict(checkpoint="b.pt"), 1077), (dict(compare_class=4), 1077), ({}, 1000)):
        with pytest.raises(SystemExit, match="is of"):
            eigs_speed.reference_from(str(path), argparse.Namespace(**{**vars(args), **changed}), samples)
