"""Bytes per rank of parameters, gradients and AdamW state for MAE pretraining under DDP and under FSDP2, counted
from the parameter shapes of models built on the meta device (no memory, no GPU).

    python benchmarks/fsdp_memory.py
    python benchmarks/fsdp_memory.py --models mae_vit_giant_patch14 --world_sizes 1 2 4 8 --json out.json

What is counted, per rank, at the optimizer step (the steady state of training), all fp32 master weights:

* ``ddp``: torch's DistributedDataParallel with its defaults (as util/runtime.py builds it). Every rank holds the
  full parameters, their gradients, AdamW's two moments and DDP's gradient buckets: with the default
  ``gradient_as_bucket_view=False`` the reducer's flat buckets are a second copy of every gradient, allocated once
  and kept (gradients are copied in for the all-reduce and back out; ``--check_ddp_buckets`` shows it on the
  installed torch). 20 bytes per trained parameter, 4 per frozen one (the fixed sin-cos position tables).
* ``fsdp``: ``fully_shard`` on every encoder and decoder block, then on the root. Each parameter is split on dim 0
  with ``torch.chunk`` and every rank's shard is padded to the first chunk's size (``FSDPParam._init_sharded_param``
  in torch/distributed/fsdp/_fully_shard/_fsdp_param.py); rank 0 holds the largest shards and is reported. Sharded
  fp32 parameters, sharded fp32 gradients (views of the padded reduce-scatter output), two sharded moments.
  ``gathered``: the unsharded parameters that FSDP all-gathers, at their largest: the root group's (the root keeps
  them from forward to backward by default) and two blocks' (the one computing and the one prefetched).
* ``fsdp-bf16``: the same under ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`` (``--fsdp --amp bf16``):
  sharded parameters, gradients and moments stay fp32; only the gathered parameters are bf16.

Not counted: activations (they depend on the batch size and ``--grad_ckpt``), one block's unsharded gradients and
the reduce-scatter buffer during FSDP's backward, autocast's weight copies, AdamW's per-tensor step counters,
the CUDA context and the allocator's fragmentation. "left of N GiB" is a card's nominal capacity minus the total:
on paper, what remains for activations.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: the repository root holds the modules

import timm  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

import models_mae  # noqa: E402,F401  (registers the mae_vit_* models)
from benchmarks.common import machine, write_json  # noqa: E402

FP32, BF16 = 4, 2
GIB = 2**30
MODES = ("ddp", "fsdp", "fsdp-bf16")


def get_args_parser():
    p = argparse.ArgumentParser("FSDP2 vs DDP memory per rank", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+",
                   default=["mae_vit_large_patch16", "mae_vit_huge_patch14", "mae_vit_giant_patch14"])
    p.add_argument("--world_sizes", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--capacities_gib", nargs="+", type=float, default=[80, 141],
                   help="GPU memory to compare with (nominal capacities)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--check_ddp_buckets", action="store_true",
                   help="also build a small DDP model (gloo, 1 process) and report whether its buckets are a copy of "
                        "the gradients under the default gradient_as_bucket_view=False")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    return p


def shard_numel(shape: torch.Size, world_size: int) -> int:
    """Elements of rank 0's (the largest, padded) FSDP2 shard of a parameter of this shape."""
    return torch.chunk(torch.empty(shape, device="meta"), world_size, dim=0)[0].numel()


def fsdp_units(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """The parameter groups FSDP2 all-gathers together: one per block, and the rest (the root's), first."""
    blocks = [*getattr(model, "blocks", ()), *getattr(model, "decoder_blocks", ())]
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    return [[p for p in model.parameters() if id(p) not in in_blocks]] + [list(b.parameters()) for b in blocks]


def count(model: torch.nn.Module, mode: str, world_size: int) -> dict:
    """Bytes per rank of each kind of state (see the module docstring for what each holds)."""
    params = list(model.parameters())
    trained = [p for p in params if p.requires_grad]
    if mode == "ddp":
        full = sum(p.numel() for p in trained)
        row = dict(params=FP32 * sum(p.numel() for p in params), grads=FP32 * full, ddp_buckets=FP32 * full,
                   adamw_moments=2 * FP32 * full, gathered=0)
    else:
        shard = {id(p): shard_numel(p.shape, world_size) for p in params}
        trained_shards = sum(shard[id(p)] for p in trained)
        root, *blocks = [world_size * sum(shard[id(p)] for p in unit) for unit in fsdp_units(model)]
        gathered = root + 2 * max(blocks, default=0)  # padded unsharded sizes
        row = dict(params=FP32 * sum(shard.values()), grads=FP32 * trained_shards, ddp_buckets=0,
                   adamw_moments=2 * FP32 * trained_shards, gathered=(BF16 if mode == "fsdp-bf16" else FP32) * gathered)
    row["total"] = sum(row.values())
    return row


def check_ddp_buckets() -> dict:
    """Whether DDP's buckets (persistent across steps) hold the gradients or a copy of them, on the installed torch:
    a comm hook records each bucket's buffer, then every ``param.grad`` is looked for inside them."""
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29571")
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        result = {}
        for as_view in (False, True):
            model = torch.nn.Sequential(*[torch.nn.Linear(64, 64) for _ in range(4)])
            ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=as_view, bucket_cap_mb=0.02)
            buffers = []

            def record(state, bucket):
                buffers.append(bucket.buffer())
                return _done(bucket.buffer())

            ddp.register_comm_hook(None, record)
            steps = []
            for _ in range(3):  # DDP rebuilds its buckets after the first step
                buffers.clear()
                ddp(torch.randn(2, 64)).sum().backward()
                steps.append([(b.data_ptr(), b.numel()) for b in buffers])
            inside = all(any(ptr <= p.grad.data_ptr() < ptr + p.element_size() * n for ptr, n in steps[-1])
                         for p in model.parameters())
            result[f"gradient_as_bucket_view={as_view}"] = dict(
                bucket_elements=sum(n for _, n in steps[-1]), param_elements=sum(p.numel() for p in model.parameters()),
                buckets_kept_across_steps=steps[1] == steps[2], grads_are_views_of_buckets=inside)
        return result
    finally:
        dist.destroy_process_group()


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    future = torch.futures.Future()
    future.set_result(tensor)  # one process: the all-reduce is the identity
    return future


def main(args):
    rows = []
    for name in args.models:
        with torch.device("meta"):  # shapes only
            model = timm.create_model(name, img_size=args.input_size)
        n_params = sum(p.numel() for p in model.parameters())
        for world_size in args.world_sizes:
            for mode in MODES:
                row = dict(model=name, n_params=n_params, mode=mode, world_size=world_size,
                           **count(model, mode, world_size))
                row["bytes_per_param"] = row["total"] / n_params
                row["left_gib"] = {f"{c:g}": c - row["total"] / GIB for c in args.capacities_gib}
                rows.append(row)

    caps = [f"{c:g}" for c in args.capacities_gib]
    header = (f"{'model':<24}{'params':>8}  {'mode':<10}{'W':>2}{'params':>9}{'grads':>8}{'buckets':>9}{'moments':>9}"
              f"{'gathered':>10}{'total':>8}{'B/param':>9}" + "".join(f"{'left/' + c:>10}" for c in caps))
    print("GiB per rank (rank 0, the largest shards); activations excluded")
    print(header)
    for r in rows:
        print(f"{r['model']:<24}{r['n_params'] / 1e6:>7.0f}M  {r['mode']:<10}{r['world_size']:>2}"
              + "".join(f"{r[k] / GIB:>{w}.2f}" for k, w in (("params", 9), ("grads", 8), ("ddp_buckets", 9),
                                                             ("adamw_moments", 9), ("gathered", 10), ("total", 8)))
              + f"{r['bytes_per_param']:>9.2f}" + "".join(f"{r['left_gib'][c]:>10.1f}" for c in caps))
    report = dict(machine=machine(), unit="bytes per rank (rank 0)", counted=__doc__.split("\n\n", 2)[2], rows=rows)
    if args.check_ddp_buckets:
        report["ddp_buckets_check"] = check_ddp_buckets()
        for setting, found in report["ddp_buckets_check"].items():
            print(f"DDP {setting}: {found}")
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
