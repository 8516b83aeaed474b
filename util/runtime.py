"""Setting up a run: processes, device, precision and seeds; the model by name, its wrappers and its optimizer."""
import ctypes
import json
import os
import random
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import timm
import torch

import models_mae  # noqa: F401  (registers the mae_vit_* models with timm)
import models_vit  # noqa: F401  (registers the vit_* classifiers)
from util import distributed, output_dir, sharded
from util.amp import resolve_amp
from util.checkpoint import jsonable_args
from util.errors import UserError


def setup_run(args) -> torch.device:
    """Start distributed mode, pick the device, resolve ``args.amp``, seed every RNG (per rank), claim the output
    directory."""
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    distributed.init_distributed_mode(args)
    device = torch.device(args.device)
    device = torch.device("cuda", args.gpu) if device.type == "cuda" and device.index is None else device
    args.amp = resolve_amp(args.amp, device)
    seed = args.seed + distributed.get_rank()
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0)) and not getattr(args, "eval", False):
        args.auto_resume = True  # torchrun restarted the workers: continue this run where it stopped
        if args.output_dir and output_dir.checkpoints(Path(args.output_dir)):
            args.resume = ""  # --resume only seeded the first attempt
    output_dir.claim(args)
    choose_attention(device, args.amp)
    if device.type == "cpu":
        keep_freed_memory()
    if device.type == "cuda":  # TF32 matmuls for the fp32 parts; cudnn autotuning for fixed input sizes
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    print(json.dumps(jsonable_args(args), indent=1))
    return device


def choose_attention(device: torch.device, amp: str) -> None:
    """PyTorch's fused attention kernel, except under bf16 on a CPU: there its kernels are 3-10x slower than timm's
    plain path (two matmuls and a softmax, as the original code computed attention) at MAE's sequence lengths, while
    in fp32 the fused kernel is as fast or faster (BENCHMARKS.md, "The bf16 step on a CPU"). Applies to the models
    built afterwards."""
    timm.layers.set_fused_attn(not (device.type == "cpu" and amp == "bf16"))


def keep_freed_memory() -> None:
    """glibc returns every large freed block to the OS and maps it afresh on the next allocation, so on CPU each step
    page-faults its activations in again (about 80,000 faults per ViT-B step at batch 8). Keeping freed memory in
    the heap removes that without raising the peak. A no-op where the C library is not glibc."""
    libc = ctypes.CDLL(None)
    if hasattr(libc, "mallopt"):
        M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
        libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)
        libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)


def finish_run() -> None:
    """End what ``setup_run`` started: release the output directory, leave the process group."""
    output_dir.release()
    distributed.destroy()


def build_model(name: str, **kwargs) -> torch.nn.Module:
    """A registered model by name (``mae_vit_*``, ``vit_*`` or any timm model); a bad name or size is a UserError."""
    if not name or not timm.is_model(name):
        family = "mae_vit_*" if (name or "").startswith("mae") else "vit_*"
        known = ", ".join(timm.list_models(family, module=["models_mae", "models_vit"]))
        raise UserError(f"unknown model {name!r}; choose from {known}")
    try:
        return timm.create_model(name, **kwargs)
    except ValueError as e:
        raise UserError(f"{name}: {e}") from None


def wrap_model(model: torch.nn.Module, args, device: torch.device):
    """``--grad_ckpt``, FSDP2 or DDP over the processes, then ``--compile``: the module to train (save ``model``)."""
    if args.grad_ckpt and hasattr(model, "set_grad_checkpointing"):  # a bare head has no blocks
        model.set_grad_checkpointing(True)
    wrapped = model.to(device)
    if getattr(args, "fsdp", False):
        wrapped = sharded.shard(model, args.amp)
    elif args.distributed:
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        if reason := compile_unavailable():
            raise UserError(f"--compile: {reason}; run without --compile")
        wrapped = torch.compile(wrapped)
    return wrapped


def compile_unavailable() -> str | None:
    """Why ``torch.compile`` cannot run here (it would fail at the first step with a compiler error), or None."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile is not supported on this Python or platform"
    if not any(shutil.which(compiler) for compiler in ("g++", "c++", "clang++")):
        return "torch.compile's code generator (inductor) needs a C++ compiler, and none is installed"
    if not os.path.isfile(os.path.join(sysconfig.get_path("include"), "Python.h")):
        return (f"torch.compile's code generator (inductor) includes Python.h, which is not in "
                f"{sysconfig.get_path('include')} (Debian: apt-get install python3-dev)")
    return None


def adamw(param_groups, lr: float, device: torch.device, betas=(0.9, 0.999)) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (CUDA, and CPU since torch 2.4): torch's default on CPU is ~3x slower."""
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas, fused=device.type in ("cuda", "cpu"))


def count_parameters(model: torch.nn.Module, trainable_only=True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
