"""Mixed precision and the optimizer update. bf16 needs no loss scaling (its exponent range is fp32's), so only fp16
scales the loss; the original's fp16 default gave NaN losses for some large models, hence bf16 by default wherever
the hardware multiplies it natively."""
from __future__ import annotations

import contextlib

import torch

from util.errors import UserError

AMP_CHOICES = ("bf16", "fp16", "none")


def cpu_has_native_bf16() -> bool:
    """bf16 dot products in hardware, as torch detects them: Intel AMX tiles, or AVX512-BF16 (AMD Zen 4 and later,
    Intel Cooper Lake). oneDNN's bf16 matmuls run there several times faster than fp32 (BENCHMARKS.md §8)."""
    return any(getattr(torch.cpu, probe, lambda: False)()
               for probe in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """``--amp`` as given, or the default for the device: bf16 where the hardware multiplies bf16 natively (GPUs that
    support it, CPUs with AMX or AVX512-BF16), else none."""
    if amp is None:
        native = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_has_native_bf16()
        return "bf16" if native else "none"
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or none on CPU")
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


class GradientUpdater:
    """Backward, unscale and clip, optimizer step, like the original's loss scaler; the GradScaler is enabled for fp16
    only. Returns the gradient norm as a device tensor (no host synchronisation) on update steps, else None."""

    def __init__(self, amp: str, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")

    def __call__(self, loss, optimizer, parameters, clip_grad=None, update_grad=True):
        self.scaler.scale(loss).backward()
        if not update_grad:
            return None
        parameters = [p for p in parameters if p.grad is not None]
        self.scaler.unscale_(optimizer)
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = total_norm([p.grad for p in parameters])
        self.scaler.step(optimizer)
        self.scaler.update()
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a sharded DTensor

    def state_dict(self):
        return self.scaler.state_dict()

    def load_state_dict(self, state):
        if state:
            self.scaler.load_state_dict(state)


def total_norm(tensors) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, left on the device."""
    if hasattr(torch.nn.utils, "get_total_norm"):  # torch >= 2.6: foreach kernels
        return torch.nn.utils.get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
