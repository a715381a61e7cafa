"""The trainer against a plain PyTorch loop written from the reference code.

The paper's code (LDAM-DRW lineage: ``cifar_train_sam.py``, ``losses.py``,
``sam.py``) trains with ``torch.optim.SGD``, ``F.cross_entropy(weight=…)``, a
``SAM`` optimizer wrapping SGD, and ``loss.backward()`` on an ``nn.Module`` in
train mode. The loop below re-implements that from the reference formulas,
independently of ``spectra.train`` (losses, DRW weights, schedule, SAM step,
input normalisation), feeds it the trainer's own batches and initial weights,
and requires the same weights and BatchNorm statistics after 4 epochs: the
whole step — not only its parts — equals the reference recipe. The network is
``smooth_net.SmoothNet`` (tanh: no ReLU kinks for rounding to flip, see there;
LDAM runs get its cosine head, as the presets); the ResNet-32 itself is
checked in tests/test_models.py.
"""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cifar_format_fixture import write_cifar10
from spectra.train import resolve_config
from spectra.train.trainer import Trainer

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
EPOCHS, WARMUP, MILESTONES, DRW_EPOCH = 4, 2, (2, 3), 1  # epochs 3 and 4 use one decay factor each


def reference_lr(epoch0: int) -> float:
    """``adjust_learning_rate`` of the reference with its constants shrunk (0-indexed epoch)."""
    epoch = epoch0 + 1
    if epoch <= WARMUP:
        return 0.1 * epoch / WARMUP
    if epoch > MILESTONES[1]:
        return 0.1 * 0.0001
    if epoch > MILESTONES[0]:
        return 0.1 * 0.01
    return 0.1


def reference_drw_weights(cls_num_list: list[int], epoch0: int) -> torch.Tensor:
    idx = 1 if epoch0 >= DRW_EPOCH else 0
    beta = [0.0, 0.9999][idx]
    effective_num = 1.0 - np.power(beta, cls_num_list)
    w = (1.0 - beta) / np.array(effective_num)
    return torch.tensor(w / np.sum(w) * len(cls_num_list), dtype=torch.float32)


def reference_loss(name: str, cls_num_list: list[int]):
    counts = np.array(cls_num_list, dtype=np.float64)
    if name == "ce":
        return lambda x, y, w: F.cross_entropy(x, y, weight=w)
    if name == "ldam":
        m = 1.0 / np.sqrt(np.sqrt(counts))
        m = torch.tensor(m * (0.5 / np.max(m)), dtype=torch.float32)

        def ldam(x, y, w):
            index = torch.zeros_like(x, dtype=torch.bool).scatter_(1, y[:, None], True)
            batch_m = (m[None, :] @ index.float().T).view(-1, 1)
            return F.cross_entropy(30.0 * torch.where(index, x - batch_m, x), y, weight=w)

        return ldam
    if name == "vs":
        temp = (1.0 / counts) ** 0.3
        delta = torch.tensor(temp / np.min(temp), dtype=torch.float32)
        iota = torch.tensor(1.0 * np.log(counts / counts.sum()), dtype=torch.float32)
        return lambda x, y, w: F.cross_entropy(x / delta + iota, y, weight=w)
    raise ValueError(name)


def sam_first_step(params: list[torch.Tensor], rho: float) -> list[torch.Tensor]:
    """The reference ``SAM.first_step``: w += ρ g / (‖g‖ + 1e-12), returns e_w."""
    grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for p in params]), p=2)
    scale = rho / (grad_norm + 1e-12)
    e_ws = []
    with torch.no_grad():
        for p in params:
            e_w = p.grad * scale
            p.add_(e_w)
            e_ws.append(e_w)
    return e_ws


def reference_lpf_noise(z: torch.Tensor, params: list[torch.Tensor], std: float) -> list[torch.Tensor]:
    """LPF-SGD's code (``lpf_train.py``): each filter row's norm for weights, the norm for vectors."""
    out, start = [], 0
    for mp in params:
        zp = z[start:start + mp.numel()].view_as(mp)
        start += mp.numel()
        if len(mp.shape) > 1:
            sh_mul = int(np.prod(mp.shape[1:]))
            temp = mp.view(mp.shape[0], -1).norm(dim=1, keepdim=True).repeat(1, sh_mul).view(mp.shape)
        else:
            temp = torch.full_like(mp, mp.view(-1).norm().item() + 1e-16)
        out.append(std * temp * zp)  # torch.normal(0, std·temp), drawn from the trainer's numbers
    return out


def lpf_step(model, params, opt, criterion, x, y, w, z, m_parts: int, std: float, batch_size: int) -> None:
    """One LPF-SGD update as its authors' loop: the batch split into parts of batch_size / M, part m's
    loss / M back-propagated at w + ε_m, then one optimizer step."""
    opt.zero_grad()
    for m, (xm, ym) in enumerate(zip(torch.split(x, batch_size // m_parts), torch.split(y, batch_size // m_parts))):
        noise = reference_lpf_noise(z[m], params, std)
        with torch.no_grad():
            for p, n in zip(params, noise):
                p.add_(n)
        (criterion(model(xm), ym, w) / m_parts).backward()
        with torch.no_grad():
            for p, n in zip(params, noise):
                p.sub_(n)
    opt.step()


def reference_run(trainer: Trainer, initial: dict, method_loss: str, drw: bool, rho: float | None,
                  lpf: tuple[int, float] | None = None) -> torch.nn.Module:
    model = copy.deepcopy(trainer.model)
    model.load_state_dict(initial)
    model.train()
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=2e-4)
    counts = list(trainer.class_counts)
    criterion = reference_loss(method_loss, counts)
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    for epoch0 in range(EPOCHS):
        for group in opt.param_groups:
            group["lr"] = reference_lr(epoch0)
        w = reference_drw_weights(counts, epoch0) if drw else None
        xs, ys = trainer.batches.epoch(epoch0 + 1)  # the trainer's batches (uint8, augmented)
        noise = trainer._noise_for_epoch(epoch0 + 1)  # the trainer's noise numbers (seeded per epoch)
        for i, (xb, yb) in enumerate(zip(xs, ys)):
            rows = trainer.batches.batch_size_of(i)  # last_batch="short": the DataLoader's short last batch
            xb, yb = xb[:rows], yb[:rows]
            x = (xb.float() / 255.0 - mean) / std  # ToTensor + Normalize
            if lpf is not None:
                z = torch.empty(lpf[0], sum(p.numel() for p in params)).normal_(generator=noise)
                lpf_step(model, params, opt, criterion, x, yb, w, z, lpf[0], lpf[1], trainer.config.batch_size)
                continue
            loss = criterion(model(x), yb, w)
            opt.zero_grad()
            loss.backward()
            if rho is None:
                opt.step()
                continue
            e_ws = sam_first_step(params, rho)
            opt.zero_grad()
            criterion(model(x), yb, w).backward()  # second pass, BatchNorm in train mode
            with torch.no_grad():
                for p, e_w in zip(params, e_ws):
                    p.sub_(e_w)
            opt.step()
    return model


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    write_cifar10(root, train_per_class=12, test_per_class=2)
    return root


@pytest.mark.parametrize("method, loss, drw, rho, last_batch", [
    ("ce", "ce", False, None, "wrap"),
    ("ce-drw", "ce", True, None, "wrap"),
    ("ce-sam", "ce", False, 0.1, "wrap"),
    ("ce-drw-sam", "ce", True, 0.5, "wrap"),
    ("ldam-drw", "ldam", True, None, "wrap"),
    ("ldam-drw-sam", "ldam", True, 0.8, "wrap"),
    ("vs", "vs", False, None, "wrap"),
    ("ce-drw", "ce", True, None, "short"),  # the reference's loader exactly: a short last batch
    ("ce-drw-sam", "ce", True, 0.5, "short"),
    ("ce-drw-lpf", "ce", True, None, "wrap"),  # LPF-SGD's loop, M = 2 parts of 8
    ("ce-drw-lpf", "ce", True, None, "short"),
])
def test_trainer_equals_plain_reference_loop(method, loss, drw, rho, last_batch, data_root, tmp_path):
    cfg = resolve_config(method, data_root=str(data_root), epochs=EPOCHS, batch_size=16, progress=False,
                         imbalance_ratio=10.0, arch="smooth_net:SmoothNet", warmup_epochs=WARMUP, lr_milestones=list(MILESTONES),
                         drw_epoch=DRW_EPOCH, compile="off", device="cpu", last_batch=last_batch, lpf_samples=2,
                         lpf_sigma=0.01, channels_last=False)  # NCHW as the loop; NHWC vs NCHW: test_train_runs.py
    assert (cfg.rho if cfg.optimizer == "sam" else None) == rho
    trainer = Trainer(cfg, tmp_path / method, log=lambda m: None)
    trainer.prepare()
    initial = copy.deepcopy(trainer.model.state_dict())
    assert trainer.batches.steps >= 3  # several steps per epoch, incl. a wrapped or short last batch
    assert (trainer.batches.last_size < 16) == (last_batch == "short")
    for epoch in range(1, EPOCHS + 1):
        trainer.train_epoch(epoch)
    lpf = (cfg.lpf_samples, cfg.lpf_sigma) if cfg.optimizer == "lpf" else None
    ref = reference_run(trainer, initial, loss, drw, rho, lpf)
    ours, theirs = trainer.model.state_dict(), ref.state_dict()
    moved = max(float((ours[k].double() - initial[k].double()).abs().max()) for k in ours if ours[k].is_floating_point())
    assert moved > 1e-2  # the runs did train
    # 1e-4: rounding, amplified by LDAM's scale 30 and SAM (measured: a 1e-7 relative change of
    # the initial weights moves the reference's own LDAM+DRW+SAM result by 2e-5); each recipe
    # change tried in the reference loop (wd 1e-4, margin sign, β 0.999, 0.9ρ, −ι, a decay
    # factor) failed this bound.
    for key in ours:
        a, b = ours[key].double(), theirs[key].double()
        assert (a - b).norm() <= 1e-4 * b.norm() + 1e-7, key
