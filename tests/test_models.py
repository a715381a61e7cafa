"""CIFAR ResNets, the cosine head and the model registry."""
import pytest
import torch
from torch import nn

from spectra.models import MODELS, CifarResNet, NormedLinear, build_model, resnet32


def test_resnet32_structure_and_size():
    model = resnet32(num_classes=10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31  # 1 stem + 3 stages × 5 blocks × 2 convs
    assert sum(p.numel() for p in model.parameters()) == 464_154  # the ResNet-32 "0.46M" of He et al.
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    assert [m.out_channels for m in (model.layer1[0].conv1, model.layer2[0].conv1, model.layer3[0].conv1)] == [16, 32, 64]


@pytest.mark.parametrize("name,depth", [("resnet8", 8), ("resnet20", 20), ("resnet32", 32), ("resnet44", 44), ("resnet56", 56), ("resnet110", 110)])
def test_depths(name, depth):
    model = MODELS[name]()
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    assert convs + 1 == depth  # convs + the linear head


def test_option_a_shortcut_is_subsample_and_zero_pad():
    block = resnet32().layer2[0]
    x = torch.randn(2, 16, 32, 32)
    out = block.shortcut(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0
    assert not any(True for _ in block.shortcut.parameters())  # parameter-free


def test_kaiming_normal_init():
    torch.manual_seed(0)
    w = resnet32().layer3[2].conv1.weight  # fan_in = 64 · 9
    assert w.std().item() == pytest.approx((2.0 / (64 * 9)) ** 0.5, rel=0.05)


def test_cosine_head_outputs_cosines():
    torch.manual_seed(0)
    head = NormedLinear(64, 10)
    x = torch.randn(5, 64)
    out = head(x)
    ref = torch.nn.functional.cosine_similarity(x[:, :, None], head.weight[None], dim=1)
    assert torch.allclose(out, ref, atol=1e-6)
    model = resnet32(num_classes=100, cosine_head=True)
    assert isinstance(model.linear, NormedLinear)
    logits = model(torch.randn(3, 3, 32, 32))
    assert logits.shape == (3, 100) and logits.abs().max() <= 1.0 + 1e-6


def test_build_model_names_and_import_specs():
    assert isinstance(build_model("resnet32", num_classes=7), CifarResNet)
    lin = build_model("torch.nn:Linear", in_features=3, out_features=2)
    assert isinstance(lin, nn.Linear) and lin.out_features == 2
    with pytest.raises(ValueError, match=r"unknown architecture 'x'; built-ins: resnet8, resnet20, resnet32"):
        build_model("x")
    with pytest.raises(ValueError, match="cannot import"):
        build_model("no_such_module_xyz:Net")
    with pytest.raises(ValueError, match="has no attribute"):
        build_model("torch.nn:NoSuchNet")
    with pytest.raises(ValueError, match="not a torch.nn.Module"):
        build_model("builtins:dict")


def test_state_dict_round_trip_reproduces_logits():
    a = resnet32(cosine_head=True).eval()
    b = build_model("resnet32", num_classes=10, cosine_head=True).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(a(x), b(x))
