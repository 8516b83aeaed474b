"""Training-step benchmark: images/s, FLOPs per step, achieved FLOP/s and its fraction of a matmul peak.

    python benchmarks/bench_step.py --model mae_vit_base_patch16 --batch_size 8 --device cpu
    python benchmarks/bench_step.py --model mae_vit_base_patch16 --batch_size 8 --device cpu --profile 2
    python benchmarks/bench_step.py --model mae_vit_large_patch16 --batch_size 64 --device cuda --amp bf16 --compile

One step is what the training programs do per iteration: forward (under autocast), backward, the gradient
norm, the AdamW update and ``zero_grad``. The time is the median over ``--steps`` timed steps after
``--warmup`` untimed ones (CUDA is synchronised before and after each timed step, never inside it). The
FLOPs of one step are counted once, on the eager model, with ``torch.utils.flop_counter.FlopCounterMode``
(matmuls, convolutions and attention; 2 FLOPs per multiply-add). The peak is a square matmul in the
step's compute dtype, timed in the same process on the same device, so the fraction is comparable across
machines.

The step's work that no faster matmul removes (gradient norm and AdamW update; under autocast the weight and
gradient casts) is also timed alone, and the best the step could do printed: its FLOPs at the peak plus that floor.

The paper's "with [M]" baseline (the encoder sees every patch, removed ones replaced by a mask token;
``benchmarks/with_mask_tokens.py``) is timed too and MAE's speedup over it printed (``--no-compare_mask_tokens``
skips it). ``--profile N`` prints where the time of N more steps goes, operator by operator (torch.profiler).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: the repository root holds the modules

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_ablations import median_ms  # noqa: E402
from benchmarks.common import cpu_model, machine, write_json  # noqa: E402
from benchmarks.flops import MatmulPeak, compute_dtype, count_flops, synchronize  # noqa: E402
from benchmarks.with_mask_tokens import MaskedAutoencoderWithMaskTokens  # noqa: E402
from util.amp import (AMP_CHOICES, GradientUpdater, autocast, cpu_has_native_bf16,  # noqa: E402
                      resolve_amp, total_norm)
from util.cli import default_device  # noqa: E402
from util.runtime import adamw, build_model, choose_attention, keep_freed_memory  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("MAE training-step benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_base_patch16",
                   help="an mae_vit_* name; fine-tuning uses the vit_* twin (the name without 'mae_')")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="autocast dtype (default as the programs: bf16 on GPUs that support it and on CPUs with AMX "
                        "or AVX512-BF16)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (the optimizer stays eager)")
    p.add_argument("--device", default=default_device())
    p.add_argument("--mode", default="pretrain", choices=("pretrain", "finetune", "both"))
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--norm_pix_loss", action="store_true")
    p.add_argument("--compare_mask_tokens", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the 'with [M]' baseline (mask tokens through the encoder) and print MAE's speedup "
                        "over it (default: on; --no-compare_mask_tokens to skip)")
    p.add_argument("--vs_fp32", action=argparse.BooleanOptionalAction, default=True,
                   help="with --amp bf16/fp16, also time the fp32 pretraining step against an fp32 peak and print the "
                        "speedup (default: on)")
    p.add_argument("--attention", default="auto", choices=("auto", "fused", "plain"),
                   help="timm's attention path: auto as the programs choose it (plain matmuls under bf16 on a CPU, "
                        "else fused), fused (F.scaled_dot_product_attention) or plain")
    p.add_argument("--keep_freed_memory", action=argparse.BooleanOptionalAction, default=True,
                   help="on CPU, keep freed memory in the heap as the programs do (util.runtime.keep_freed_memory); "
                        "--no-keep_freed_memory measures glibc's default")
    p.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing of the encoder blocks")
    p.add_argument("--drop_path", default=0.1, type=float, help="stochastic depth of the fine-tuning model")
    p.add_argument("--optimizer", default="auto", choices=("auto", "fused", "foreach", "forloop"),
                   help="AdamW implementation (auto: util.runtime.adamw, as the training programs: fused on CUDA "
                        "and CPU)")
    p.add_argument("--steps", default=5, type=int, help="timed steps (the median is reported)")
    p.add_argument("--warmup", default=2, type=int, help="untimed steps first (allocator, autotuning, compile)")
    p.add_argument("--peak_sizes", default=None,
                   help="comma-separated square matmul sizes for the peak (default: 2048,3072,4096 on CPU, "
                        "4096,8192 on CUDA); the best median is the peak")
    p.add_argument("--peak_reps", default=5, type=int)
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--profile", default=0, type=int, metavar="N",
                   help="after timing, profile N more steps of each kind with torch.profiler and print where the "
                        "time goes: the top operators and the share spent in matmul-class kernels")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    return p


# ------------------------------------------------------------------------------------------ environment
def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()


def environment(device: torch.device) -> dict:
    env = {
        **machine(),
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")},
        "fused_attn": bool(timm.layers.use_fused_attn()),  # read after main() chose the attention path
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
        env["tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return env


# ---------------------------------------------------------------------------------------------- step
def build(args, kind: str, device: torch.device):
    """The model and a batch for one kind of step: pretrain, pretrain_mask_tokens or finetune."""
    if kind == "finetune":
        name = args.model[len("mae_"):] if args.model.startswith("mae_") else args.model
        model = build_model(name, img_size=args.input_size, num_classes=1000, drop_path_rate=args.drop_path)
        if args.grad_ckpt:
            model.set_grad_checkpointing(True)
    else:
        name = args.model
        model = build_model(name, img_size=args.input_size, norm_pix_loss=args.norm_pix_loss, grad_ckpt=args.grad_ckpt)
        if kind == "pretrain_mask_tokens":
            model = MaskedAutoencoderWithMaskTokens.like(model)
    model.to(device).train()
    in_chans = getattr(model, "in_chans", 3)
    imgs = torch.randn(args.batch_size, in_chans, args.input_size, args.input_size, device=device)
    labels = torch.randint(0, 1000, (args.batch_size,), device=device)
    return name, model, imgs, labels


def make_optimizer(model, args, device):
    """AdamW over the model's parameter groups; ``auto`` is util.runtime.adamw, what the training programs use."""
    from timm.optim import param_groups_weight_decay

    nwd = model.no_weight_decay() if hasattr(model, "no_weight_decay") else ()
    groups = param_groups_weight_decay(model, 0.05, no_weight_decay_list=nwd)
    if args.optimizer == "auto":
        optimizer = adamw(groups, 1e-4, device, betas=(0.9, 0.95))
        return optimizer, "fused" if optimizer.defaults["fused"] else "torch default"
    flags = {"fused": dict(fused=True), "foreach": dict(foreach=True), "forloop": dict(foreach=False)}[args.optimizer]
    return torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95), **flags), args.optimizer


def make_step(kind, forward_module, imgs, labels, optimizer, updater, params, args, device):
    """A closure doing one training step; it returns the loss tensor and reads nothing back to the host."""
    def step():
        with autocast(args.amp, device):
            if kind == "finetune":
                loss = F.cross_entropy(forward_module(imgs), labels)
            else:
                loss = forward_module(imgs, mask_ratio=args.mask_ratio)[0]
        updater(loss, optimizer, params)
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def time_steps(step, device, warmup: int, steps: int, peak: MatmulPeak):
    """Per timed step: its wall time and the matmul peak probed right after it."""
    losses = [step() for _ in range(warmup)]
    times, peaks = [], []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - t0)
        peaks.append(peak.probe())
    return times, peaks, losses


def time_update_floor(optimizer, params, args, device, reps: int = 5) -> dict:
    """What a step does besides its matmuls and that no matmul speed-up removes, timed alone on the model's own
    parameters (median of ``reps`` after 2 warm-up calls): the gradient norm and the AdamW update, and under autocast
    the cast of every matmul weight to the compute dtype and of its gradient back to fp32 (autocast and autograd do
    both every step). Runs after the timed steps: the update changes the weights."""
    for p in params:
        p.grad = torch.full_like(p, 1e-3)

    def median_s(fn):  # each call ends synchronised, so the next one starts with an idle device
        return median_ms(lambda: (fn(), synchronize(device)), reps) / 1e3

    update_s = median_s(lambda: (total_norm([p.grad for p in params]), optimizer.step()))
    cast_s = 0.0
    if args.amp != "none":
        dtype, weights = compute_dtype(args.amp), [p for p in params if p.ndim >= 2]
        cast_s = median_s(lambda: [w.to(dtype).to(torch.float32) for w in weights])
    optimizer.zero_grad(set_to_none=True)
    return {"update_s": update_s, "cast_s": cast_s}


# operators doing the counted FLOPs (matmuls, convolutions, attention); the rest is memory-bound or overhead
MATMUL_CLASS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
                "aten::convolution_backward", "aten::cudnn_convolution", "aten::_scaled_dot_product",
                "aten::_flash_attention", "aten::_efficient_attention", "aten::_cudnn_attention")


def profile_steps(step, device: torch.device, steps: int, top: int = 15) -> dict:
    """Self time per operator over ``steps`` steps (device time on CUDA): where the step's time goes."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        synchronize(device)
    attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    ops = [(e.key, getattr(e, attr), e.count) for e in prof.key_averages()]
    total = sum(t for _, t, _ in ops) or 1.0
    return {
        "steps": steps,
        "ms_per_step": total / 1e3 / steps,
        "matmul_class_share": sum(t for k, t, _ in ops if k.startswith(MATMUL_CLASS)) / total,
        "top_ops": [{"op": k, "ms_per_step": t / 1e3 / steps, "share": t / total, "calls_per_step": c / steps}
                    for k, t, c in sorted(ops, key=lambda o: -o[1])[:top]],
    }


def format_profile(kind: str, prof: dict) -> str:
    lines = [f"profile of '{LABELS[kind]}' ({prof['steps']} steps, {prof['ms_per_step']:.0f} ms of operator self "
             f"time per step; matmul-class kernels {prof['matmul_class_share']:.1%}):",
             f"  {'operator':<64}{'ms/step':>9}{'share':>8}{'calls':>7}"]
    for op in prof["top_ops"]:
        lines.append(f"  {op['op'][:63]:<64}{op['ms_per_step']:>9.1f}{op['share']:>8.1%}{op['calls_per_step']:>7.0f}")
    return "\n".join(lines)


def bench_one(args, kind: str, device: torch.device, peak: MatmulPeak) -> dict:
    torch.manual_seed(args.seed)
    name, model, imgs, labels = build(args, kind, device)
    optimizer, impl = make_optimizer(model, args, device)
    updater = GradientUpdater(args.amp, device)
    params = [p for p in model.parameters() if p.requires_grad]
    eager = make_step(kind, model, imgs, labels, optimizer, updater, params, args, device)
    flops = count_flops(eager)  # counted eagerly: the compiled step does the same arithmetic
    forward_module = torch.compile(model) if args.compile else model
    step = make_step(kind, forward_module, imgs, labels, optimizer, updater, params, args, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    step()  # the first call compiles; kept out of the warm-up count so --warmup means the same either way
    first_step_s = time.perf_counter() - t0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    times, peaks, losses = time_steps(step, device, args.warmup, args.steps, peak)
    # CPU seconds this process got per wall second per thread: well below 1, other work shared the cores
    cpu_share = (time.process_time() - cpu0) / (time.perf_counter() - wall0) / torch.get_num_threads()
    final_loss = float(losses[-1])  # one read-back, after the timing
    median = statistics.median(times)
    # each step against the peak probed next to it, then the median: robust to a load that drifts
    fraction = statistics.median(flops / t / p for t, p in zip(times, peaks))
    result = {
        "kind": kind,
        "model": name,
        "parameters": sum(p.numel() for p in params),
        "optimizer": impl,
        "first_step_s": first_step_s,
        "step_times_s": times,
        "step_time_s": median,
        "images_per_s": args.batch_size / median,
        "flops_per_step": flops,
        "flops_per_image": flops / args.batch_size,
        "flops_per_s": flops / median,
        "peak_flops_per_s": statistics.median(peaks),
        "fraction_of_peak": fraction,
        "cpu_share": cpu_share if device.type == "cpu" else None,
        "final_loss": final_loss,
        "loss_finite": bool(torch.isfinite(torch.tensor(final_loss))),
    }
    if device.type == "cuda":
        result["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if args.profile:
        result["profile"] = profile_steps(step, device, args.profile)
    floor = time_update_floor(optimizer, params, args, device)
    # the best this step could do if every counted FLOP ran at the probed peak and only the floor were added
    best_s = flops / result["peak_flops_per_s"] + floor["update_s"] + floor["cast_s"]
    result.update(floor_s=floor, best_step_s=best_s, best_fraction_of_peak=flops / result["peak_flops_per_s"] / best_s)
    del model, optimizer, forward_module, step, eager
    gc.collect()
    return result


# ---------------------------------------------------------------------------------------------- main
LABELS = {"pretrain": "MAE pretrain", "pretrain_mask_tokens": "pretrain with [M]", "finetune": "fine-tune"}


def format_table(report: dict) -> str:
    peak = report["peak"]
    args = report["args"]
    lines = [
        f"{report['device']} ({report['device_type']}), torch {report['torch']}, {report['threads']} threads, "
        f"{report['date']}",
        f"batch {args['batch_size']}, {args['input_size']} px, amp {args['amp']}, compile {args['compile']}, "
        f"mask ratio {args['mask_ratio']}, attention {'fused' if report['fused_attn'] else 'plain'}"
        + (f", freed memory {'kept' if args['keep_freed_memory'] else 'returned (glibc default)'}"
           if report["device_type"] == "cpu" else ""),
        f"{'step':<20}{'model':<24}{'img/s':>9}{'ms/step':>10}{'GFLOP/step':>12}{'GFLOP/s':>10}{'of peak':>9}"
        f"{'cpu share':>11}",
    ]
    for r in report["runs"]:
        lines.append(f"{LABELS[r['kind']]:<20}{r['model']:<24}{r['images_per_s']:>9.2f}{r['step_time_s'] * 1e3:>10.1f}"
                     f"{r['flops_per_step'] / 1e9:>12.1f}{r['flops_per_s'] / 1e9:>10.1f}{r['fraction_of_peak']:>9.1%}"
                     + (f"{r['cpu_share']:>11.0%}" if r.get("cpu_share") is not None else f"{'-':>11}"))
    by_size = ", ".join(f"{n}: {v / 1e9:.1f}" for n, v in peak["flops_per_s_by_size"].items())
    lines.append(f"matmul peak ({peak['dtype']}, {peak['size']}x{peak['size']}, median of the sweep and "
                 f"{peak['probes']} probes between steps): {peak['flops_per_s'] / 1e9:.1f} GFLOP/s "
                 f"(sweep, median of {peak['reps']}, GFLOP/s by size: {by_size})")
    lines.append("'of peak': median over steps of the step's FLOP/s over the peak probed right after it; 'cpu share': "
                 "CPU time this process got per thread per wall second (well below 100 %: the cores were shared)")
    for r in report["runs"]:
        if r["kind"] == "pretrain":
            f = r["floor_s"]
            lines.append(f"not matmul work, timed alone: gradient norm + AdamW {f['update_s'] * 1e3:.0f} ms, "
                         f"weight and gradient casts {f['cast_s'] * 1e3:.0f} ms per step; with every FLOP at the "
                         f"probed peak the step would take {r['best_step_s'] * 1e3:.0f} ms: at most "
                         f"{r['best_fraction_of_peak']:.1%} of peak at this batch size")
    v = report.get("vs_fp32")
    if v:
        lines.append(f"{args['amp']} pretraining step: {v['fraction_of_peak']:.1%} of the {peak['dtype']} matmul "
                     f"peak, {v['speedup']:.2f}x the fp32 step of this run ({v['fp32_images_per_s']:.2f} img/s, "
                     f"{v['fp32_fraction_of_peak']:.1%} of the fp32 peak of "
                     f"{v['fp32_peak_flops_per_s'] / 1e9:.1f} GFLOP/s, attention "
                     f"{'fused' if report['fp32_fused_attn'] else 'plain'}); at most {v['best_speedup']:.2f}x with "
                     f"every {args['amp']} FLOP at the peak")
    if report.get("no_native_bf16"):
        lines.append("this CPU has no native bf16 (neither AMX nor AVX512-BF16): bf16 matmuls are emulated and "
                     "cannot be fast here")
    s = report.get("speedup_vs_mask_tokens")
    if s:
        lines.append(f"MAE speedup over 'with [M]': {s['wall_clock']:.2f}x wall clock ({s['peak_normalised']:.2f}x "
                     f"normalised by the probed peak), {s['flops']:.2f}x fewer FLOPs")
    return "\n".join(lines)


def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.mask_ratio < 1.0:
        raise SystemExit(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    args.amp = resolve_amp(args.amp, device)
    choose_attention(device, args.amp)
    if args.attention != "auto":
        timm.layers.set_fused_attn(args.attention == "fused")
    if device.type == "cpu" and args.keep_freed_memory:
        keep_freed_memory()
    if device.type == "cuda":  # as the training programs set it
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True

    report = environment(device)
    report["args"] = dict(vars(args))
    default_sizes = "4096,8192" if device.type == "cuda" else "2048,3072,4096"
    sizes = [int(s) for s in (args.peak_sizes or default_sizes).split(",")]
    peak = MatmulPeak(device, compute_dtype(args.amp))
    peak.sweep(sizes, args.peak_reps)

    kinds = []
    if args.mode in ("pretrain", "both"):
        kinds.append("pretrain")
        if args.compare_mask_tokens:
            kinds.append("pretrain_mask_tokens")
    if args.mode in ("finetune", "both"):
        kinds.append("finetune")
    report["runs"] = [bench_one(args, kind, device, peak) for kind in kinds]
    report["peak"] = peak.report(args.peak_reps)

    runs = {r["kind"]: r for r in report["runs"]}
    if "pretrain" in runs and "pretrain_mask_tokens" in runs:
        mae, with_m = runs["pretrain"], runs["pretrain_mask_tokens"]
        report["speedup_vs_mask_tokens"] = {
            "wall_clock": with_m["step_time_s"] / mae["step_time_s"],
            "flops": with_m["flops_per_step"] / mae["flops_per_step"],
            # the same, each step time in units of the matmul probed beside it (load drift cancels)
            "peak_normalised": (with_m["step_time_s"] * with_m["peak_flops_per_s"])
                               / (mae["step_time_s"] * mae["peak_flops_per_s"]),
        }
    if args.vs_fp32 and args.amp != "none" and "pretrain" in runs:
        fp32_peak = MatmulPeak(device, torch.float32)
        fp32_peak.sweep(sizes, args.peak_reps)
        fp32_args = argparse.Namespace(**{**vars(args), "amp": "none", "profile": 0})
        if args.attention == "auto":  # the fp32 step as the programs run it (fused attention on CPUs too)
            choose_attention(device, "none")
        fp32 = bench_one(fp32_args, "pretrain", device, fp32_peak)
        report["fp32_fused_attn"] = bool(timm.layers.use_fused_attn())
        report["runs_fp32"] = [fp32]
        report["vs_fp32"] = {"speedup": fp32["step_time_s"] / runs["pretrain"]["step_time_s"],
                             "fraction_of_peak": runs["pretrain"]["fraction_of_peak"],
                             "fp32_images_per_s": fp32["images_per_s"],
                             "fp32_fraction_of_peak": fp32["fraction_of_peak"],
                             "fp32_peak_flops_per_s": fp32["peak_flops_per_s"],
                             "best_speedup": fp32["step_time_s"] / runs["pretrain"]["best_step_s"]}
    report["no_native_bf16"] = device.type == "cpu" and args.amp == "bf16" and not cpu_has_native_bf16()
    print(format_table(report))
    for r in report["runs"]:
        if "profile" in r:
            print(format_profile(r["kind"], r["profile"]))
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
