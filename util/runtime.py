"""Setting up a run: distributed mode, device, seeds, the model and its DDP / compile wrappers."""
from __future__ import annotations

import json
import os
import random

import numpy as np
import timm
import torch

from util import distributed
from util.amp import resolve_amp
from util.errors import UserError


def setup_run(args) -> torch.device:
    """Start distributed mode, pick the device, seed every RNG (differently per rank) and create the output
    directory. Sets ``args.amp`` to the resolved precision and ``args.world_size`` / ``args.rank``."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", args.gpu)
    try:
        args.amp = resolve_amp(args.amp, device)
    except ValueError as e:
        raise UserError(str(e)) from None
    seed = args.seed + distributed.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if args.output_dir:
        os.makedirs(args.output_dir, exist_ok=True)
    if device.type == "cuda":
        # TF32 matmuls for the fp32 parts; cudnn autotuning for fixed input sizes
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(json.dumps(jsonable_args(args), indent=1))
    return device


def jsonable_args(args) -> dict:
    """``vars(args)`` with only plain values, so checkpoints load with ``weights_only=True``."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


def build_model(name: str, **kwargs) -> torch.nn.Module:
    """A registered model by name (``mae_vit_*`` or ``vit_*``), with bad names and sizes as UsageErrors."""
    import models_mae  # noqa: F401  (registers the models with timm)
    import models_vit  # noqa: F401

    if not name or not timm.is_model(name):
        family = "mae_vit_*" if (name or "").startswith("mae") else "vit_*"
        known = ", ".join(timm.list_models(family, module=["models_mae", "models_vit"]) or timm.list_models("*vit*")[:10])
        raise UserError(f"unknown model {name!r}; choose from {known}")
    try:
        return timm.create_model(name, **kwargs)
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None


def wrap_model(model: torch.nn.Module, args, device: torch.device):
    """Activation checkpointing if ``--grad_ckpt``, DDP when there are several processes (no
    ``find_unused_parameters``), then ``torch.compile`` if asked.

    Returns the module to call in training; save ``model`` itself (the unwrapped one).
    """
    if getattr(args, "grad_ckpt", False) and hasattr(model, "set_grad_checkpointing"):  # a bare head has no blocks
        # timm's switch, which both model families have: MAE's encoder blocks (its grad_ckpt option) and a
        # timm VisionTransformer's blocks; checkpointing changes no parameter, so checkpoints are unaffected
        model.set_grad_checkpointing(True)
    model.to(device)
    wrapped = model
    if args.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    if args.compile:
        wrapped = torch.compile(wrapped)
    return wrapped


def adamw_implementation(device: torch.device) -> dict:
    """The fastest AdamW torch has for ``device``: the fused kernel where it exists (CUDA, and CPU since torch 2.4;
    one pass over parameters, gradients and both moments), else the multi-tensor (foreach) one. torch's own default
    on CPU is the per-parameter for-loop, ~3x slower (benchmarks/bench_ablations.py)."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return {"fused": True} if device.type in _get_fused_kernels_supported_devices() else {"foreach": True}


def count_parameters(model: torch.nn.Module, trainable_only=True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
