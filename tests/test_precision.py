"""Precision and the CPU step: the default by hardware, how far a bf16 training step is from fp32's, and the
process-wide CPU choices of util.runtime (attention path, freed memory)."""
import ctypes
import subprocess
import sys

import pytest
import timm
import torch

from conftest import REPO
from util import amp, runtime
from util.amp import autocast, resolve_amp
from util.runtime import build_model


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "none")])
def test_cpu_default_is_bf16_only_with_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(amp, "cpu_has_native_bf16", lambda: native)
    assert resolve_amp(None, torch.device("cpu")) == expected
    assert resolve_amp("none", torch.device("cpu")) == "none"  # an explicit flag wins
    assert resolve_amp("bf16", torch.device("cpu")) == "bf16"


def test_detection_matches_the_cpu_flags():
    try:
        flags = open("/proc/cpuinfo").read().split()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    assert amp.cpu_has_native_bf16() == (("amx_bf16" in flags and "amx_tile" in flags) or "avx512_bf16" in flags)


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


@pytest.mark.parametrize("device,precision,fused", [("cpu", "bf16", False), ("cpu", "none", True),
                                                     ("cuda", "bf16", True)])
def test_attention_path_by_device_and_precision_computes_the_same(device, precision, fused):
    """choose_attention: timm's plain matmul path under bf16 on a CPU (faster there), the fused kernel elsewhere; the
    choice only changes speed. No CUDA device is touched: only the device type matters."""
    images = torch.randn(2, 3, 32, 32)
    outputs = {}
    try:
        for expected, (dev, amp_) in ((fused, (device, precision)), (not fused, ("cpu", "bf16" if fused else "none"))):
            runtime.choose_attention(torch.device(dev), amp_)
            torch.manual_seed(0)
            model = build_model("mae_vit_tiny_patch4", img_size=32)
            assert {m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")} == {expected}
            torch.manual_seed(1)
            outputs[expected] = model(images, mask_ratio=0.75)[1]
    finally:
        timm.layers.set_fused_attn(True)
    torch.testing.assert_close(outputs[True], outputs[False], rtol=1e-5, atol=1e-5)


PAGE_FAULTS = """
import resource, sys, torch
from util.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    keep_freed_memory()
for _ in range(3):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # warm-up
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(64 << 20, dtype=torch.uint8).fill_(1)  # 64 MiB allocated, touched and freed
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not hasattr(ctypes.CDLL(None), "mallopt"), reason="the C library is not glibc")
def test_keep_freed_memory_stops_page_faulting_reallocated_memory():
    faults = {}
    for mode in ("default", "keep"):
        out = subprocess.run([sys.executable, "-c", PAGE_FAULTS, mode], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        faults[mode] = int(out.stdout)
    pages = 10 * (64 << 20) // 4096
    assert faults["default"] > pages / 2  # glibc maps every 64 MiB block afresh: each page faults in again
    assert faults["keep"] < faults["default"] / 4, faults  # kept in the heap: at most a re-grow or two fault
