"""Precision: the default by hardware, and how far a bf16 training step is from fp32's."""
import pytest
import torch

from util import amp
from util.amp import autocast, resolve_amp
from util.runtime import build_model


@pytest.mark.parametrize("amx,expected", [(True, "bf16"), (False, "none")])
def test_cpu_default_is_bf16_only_with_bf16_matrix_units(monkeypatch, amx, expected):
    monkeypatch.setattr(amp, "cpu_has_bf16_matrix_units", lambda: amx)
    assert resolve_amp(None, torch.device("cpu")) == expected
    assert resolve_amp("none", torch.device("cpu")) == "none"  # an explicit flag wins
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"


def test_detection_matches_the_cpu_flags():
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert amp.cpu_has_bf16_matrix_units() == ("amx_bf16" in flags and "amx_tile" in flags)


def step(model, images, precision):
    """Loss and gradients of one pretraining step on ``images`` with the mask drawn from seed 0."""
    model.zero_grad()
    torch.manual_seed(0)
    with autocast(precision, torch.device("cpu")):
        loss, _, _ = model(images, mask_ratio=0.75)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_bf16_step_stays_close_to_fp32():
    """Tolerances: bf16 keeps 8 bits of mantissa (relative rounding 2^-9 = 0.2 %); through a few blocks the loss
    moves under 0.1 % and each gradient tensor under 5 % in norm (fp32 accumulation in the matmuls)."""
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=32, norm_pix_loss=True)
    images = torch.randn(8, 3, 32, 32)
    loss32, grads32 = step(model, images, "none")
    loss16, grads16 = step(model, images, "bf16")
    assert loss16 != loss32  # bf16 really ran
    assert abs(loss16 - loss32) / loss32 < 0.001
    errors = {n: ((grads16[n] - g).norm() / g.norm()).item() for n, g in grads32.items() if g.norm() > 0}
    worst = max(errors, key=errors.get)
    print(f"loss {loss32:.5f} vs {loss16:.5f}; worst gradient {worst}: {errors[worst]:.4f}")
    assert errors[worst] < 0.05, (worst, errors[worst])
