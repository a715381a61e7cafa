"""TrainConfig.validate's cross-field checks: settings valid alone that would
silently do nothing together, and the seeds' bounds."""
import pytest

from spectra.train import TrainConfig, resolve_config


@pytest.mark.parametrize("name", ["seed", "data_seed"])
def test_seeds_are_bounded_to_32_bits_and_named(name):
    TrainConfig(**{name: 2 ** 32 - 1}).validate()
    for bad in (2 ** 32, 3_000_000_000_000, -1):
        with pytest.raises(ValueError, match=rf"^{name} must be >= 0 and < 4294967296; got {bad}$") as err:
            TrainConfig(**{name: bad}).validate()
        assert "--lt-seed" not in str(err.value)  # an option of `spectra eigs`, not of `spectra train`


def test_an_explicit_drw_epoch_at_or_after_the_end_is_refused():
    with pytest.raises(ValueError, match=r"^drw_epoch 50 >= epochs 2: DRW would never switch on .*drw_epoch < 2$"):
        resolve_config("ce-drw", epochs=2, drw_epoch=50)
    with pytest.raises(ValueError, match="DRW would never switch on"):
        resolve_config("ce-drw-sam", epochs=3, drw_epoch=3)
    assert resolve_config("ce-drw", epochs=3, drw_epoch=2).drw_epoch == 2
    assert resolve_config("ce", epochs=2, drw_epoch=50).drw_epoch == 50  # no DRW in the preset: nothing to switch
    # the scaled default (80 % of epochs) stays allowed for 1- and 2-epoch checks
    assert resolve_config("ce-drw", epochs=1).resolved_drw_epoch() == 1


@pytest.mark.parametrize("dataset", ["cifar10", "cifar100"])
def test_imbalance_settings_on_a_balanced_data_set_are_refused(dataset):
    with pytest.raises(ValueError, match=rf"^imbalance_ratio 50 applies to the -lt data sets only .*; {dataset} is balanced$"):
        resolve_config("ce", dataset, imbalance_ratio=50.0)
    with pytest.raises(ValueError, match=r"^imbalance_profile 'step' applies to the -lt data sets only"):
        resolve_config("ce", dataset, imbalance_profile="step")
    # the defaults and ratio 1 (balanced) say nothing wrong about a balanced set
    assert resolve_config("ce", dataset).imbalance_ratio == 100.0
    assert resolve_config("ce", dataset, imbalance_ratio=1.0).imbalance_ratio == 1.0
    assert resolve_config("ce", f"{dataset}-lt", imbalance_ratio=50.0, imbalance_profile="step").imbalance_ratio == 50.0


def test_settings_without_effect_follow_the_resolved_config():
    """A setting counts as used when the resolved optimizer / loss / DRW uses it, whatever the preset."""
    from spectra.train.config import settings_without_effect

    keys = ["rho", "pgd_interval", "lpf_sigma", "vs_tau", "ldam_scale", "drw_epoch", "lr", "epochs"]
    assert settings_without_effect(resolve_config("ce"), keys) == {
        "rho": "optimizer sam", "pgd_interval": "optimizer pgd", "lpf_sigma": "optimizer lpf", "vs_tau": "loss vs",
        "ldam_scale": "loss ldam", "drw_epoch": "DRW (drw=true)"}
    assert settings_without_effect(resolve_config("ce", optimizer="sam", rho=0.3), ["rho"]) == {}
    assert set(settings_without_effect(resolve_config("ldam-drw-sam"), keys)) == {"pgd_interval", "lpf_sigma", "vs_tau"}


def test_lr_milestones_must_increase():
    """learning_rate takes the last milestone passed: with [150, 100] factor[1] applies from epoch 101 on and
    factor[0] never does."""
    with pytest.raises(ValueError, match=r"increasing order; got \[150, 100\]"):
        resolve_config("ce", lr_milestones=[150, 100])
    assert resolve_config("ce", lr_milestones=[100, 150]).resolved_lr_milestones() == [100, 150]


def test_a_milestone_at_or_after_the_last_epoch_is_refused():
    """The rate drops once epoch > milestone, so a milestone >= epochs never applies."""
    with pytest.raises(ValueError, match=r"^lr_milestones 200, 250 >= epochs 200: that decay would never happen"):
        resolve_config("ce", lr_milestones=[100, 200, 250], lr_factors=[0.1, 0.01, 0.001])
    assert resolve_config("ce", epochs=20, lr_milestones=[10, 19]).resolved_lr_milestones() == [10, 19]
    assert resolve_config("ce", epochs=3).resolved_lr_milestones() == [2, 3]  # scaled default: allowed for short checks


def test_milestones_hidden_by_a_warm_up_over_the_whole_run_are_refused():
    """The rate drops for epochs after the milestone AND the warm-up: with warm-up >= epochs, never."""
    with pytest.raises(ValueError, match=r"^lr_milestones 1, 2 never apply: the warm-up \(warmup_epochs 5\) lasts the whole run"):
        resolve_config("ce", epochs=3, lr_milestones=[1, 2])
    with pytest.raises(ValueError, match="never apply"):
        resolve_config("ce", epochs=2, warmup_epochs=2, lr_milestones=[1], lr_factors=[0.1])
    assert resolve_config("ce", epochs=3, warmup_epochs=2, lr_milestones=[1], lr_factors=[0.1]).warmup_epochs == 2


def test_the_config_of_a_run_to_resume_skips_the_newer_combination_checks():
    """A run made before a check was added (e.g. milestones beyond its epochs) must still resume."""
    with pytest.raises(ValueError, match="never happen"):
        resolve_config("ce", epochs=3, lr_milestones=[160, 180])
    assert resolve_config("ce", epochs=3, lr_milestones=[160, 180], new_run=False).lr_milestones == [160, 180]
    with pytest.raises(ValueError, match="must be >= 0"):  # types and ranges are always checked
        resolve_config("ce", epochs=3, lr_milestones=[-1, 180], new_run=False)


def test_an_explicit_warm_up_longer_than_the_run_is_refused():
    with pytest.raises(ValueError, match=r"^warmup_epochs 30 > epochs 20: the run would end inside its warm-up"):
        resolve_config("ce", epochs=20, warmup_epochs=30)
    assert resolve_config("ce", epochs=20, warmup_epochs=20).warmup_epochs == 20
    assert resolve_config("ce", epochs=2).warmup_epochs == 5  # the default stays allowed for 1- and 2-epoch checks
