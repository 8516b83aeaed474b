"""Mixed precision and the optimizer update, device-agnostic through ``torch.amp``.

bf16 needs no loss scaling (its exponent range is fp32's), so a GradScaler exists only for fp16; the
original code's fp16 default produced NaN losses for some large models, hence bf16 by default on GPUs
that support it and full precision on CPU.
"""
from __future__ import annotations

import contextlib

import torch

from util.errors import UserError

AMP_CHOICES = ("bf16", "fp16", "none")


def resolve_amp(amp: str | None, device: torch.device) -> str:
    """``--amp`` as given, or the default for the device: bf16 on GPUs that support it, else none."""
    if amp is None:
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return "bf16"
        return "none"
    if amp not in AMP_CHOICES:
        raise UserError(f"--amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "fp16" and device.type == "cpu":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or none on CPU")
    return amp


def autocast(amp: str, device: torch.device):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


class GradientUpdater:
    """Backward, optional unscale + clipping, optimizer step; with a GradScaler only for fp16.

    Returns the gradient norm as a tensor (no host synchronisation) on update steps, else None.
    """

    state_dict_key = "amp_scaler"

    def __init__(self, amp: str, device: torch.device):
        self.scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None

    def __call__(self, loss, optimizer, parameters, clip_grad=None, update_grad=True):
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
        else:
            loss.backward()
        if not update_grad:
            return None
        parameters = [p for p in parameters if p.grad is not None]
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        if clip_grad is not None:
            norm = torch.nn.utils.clip_grad_norm_(parameters, clip_grad)
        else:
            norm = total_norm([p.grad for p in parameters])
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        else:
            optimizer.step()
        return norm

    def state_dict(self):
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state):
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


def total_norm(tensors) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, left on the device (no host synchronisation)."""
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)  # torch >= 2.6: foreach kernels
    if get_total_norm is not None:
        return get_total_norm(tensors)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))
