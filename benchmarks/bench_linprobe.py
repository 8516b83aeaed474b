"""Linear-probe benchmark: the standard probe against ``--cache_features``, per-epoch time and accuracy.

    python benchmarks/bench_linprobe.py
    python benchmarks/bench_linprobe.py --checkpoint OUT/pretrain/checkpoint-last.pth --epochs 10 --json lp.json

Fashion-MNIST and the demo's model: unless ``--checkpoint`` names one, a short ``main_pretrain.py`` run of
``mae_vit_micro_patch4`` at 28 px makes the pretrained encoder. Then ``main_linprobe.py`` probes it twice with
the same command line, seed and head (the demo's probe recipe: mean-pooled tokens, BatchNorm + Linear, LARS,
no weight decay, no warm-up; a larger learning rate, see ``--blr``), once as standard (the encoder runs on
augmented images every epoch) and once with ``--cache_features`` (the encoder runs once over un-augmented
images, then only the head trains). A third run (``--no-unaugmented`` skips it) is the standard probe with
``--no_train_augmentation``: the same images as the cache, so its accuracy against the cached one isolates
the cache, and the standard probe's against it the augmentation.

Every program runs as a user would run it (a subprocess, same environment). An epoch's time is what
main_linprobe.py prints after each epoch (training, evaluation on the 10,000 test images, checkpoint); the
figure is the median over epochs. The one-time feature extraction is reported apart, with the number of epochs
after which the cache has paid for itself. Accuracy is top-1 on the test set after the last epoch (not the best
epoch: choosing epochs on the test set would flatter both).
"""
from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # flat layout: the repository root holds the modules

from benchmarks.common import cpu_model, machine, write_json  # noqa: E402
from util.datasets import DEBIAN_FASHION_MNIST_DIR  # noqa: E402
from util.logger import final_test_accuracy  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("MAE linear-probe benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--data_path", default=DEBIAN_FASHION_MNIST_DIR, help="Fashion-MNIST's idx files")
    p.add_argument("--checkpoint", default="", help="an MAE checkpoint to probe (default: pretrain one first)")
    p.add_argument("--pretrain_images", default=20000, type=int, help="first N training images for pretraining")
    p.add_argument("--pretrain_epochs", default=2, type=int)
    p.add_argument("--model", default="vit_micro_patch4",
                   help="the classifier to probe; pretraining uses its MAE twin (mae_ + this name)")
    p.add_argument("--probe_images", default=20000, type=int, help="first N training images for the probe (0: all)")
    p.add_argument("--epochs", default=10, type=int, help="probe epochs (same for both probes)")
    p.add_argument("--blr", default=20.0, type=float,
                   help="probe base learning rate (absolute lr = blr x batch / 256: 10 by default, of the order of the "
                        "original recipe's 0.1 x 16384 / 256 = 6.4; the demo's blr 0.1 at batch 128 leaves the LARS "
                        "probe far from converged after 10 epochs)")
    p.add_argument("--batch_size", default=128, type=int)
    p.add_argument("--num_workers", default=1, type=int, help="loader workers of the standard probe")
    p.add_argument("--threads", default=None, type=int,
                   help="OMP_NUM_THREADS for the programs (default: the environment's); on a machine shared with "
                        "other work, 1 avoids OpenMP threads waiting for each other")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--output_dir", default=None, help="keep the runs here (default: a temporary directory)")
    p.add_argument("--unaugmented", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the standard probe with --no_train_augmentation (the images the cache holds), to "
                        "separate the cache's effect from the augmentation's")
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    return p


def run(program: str, argv: list[str], env: dict) -> tuple[str, float]:
    """Run a program of the repository; its stdout and wall time. A failure stops the benchmark with its log."""
    print("$ python " + " ".join([program, *argv]), flush=True)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, program, *argv], cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.stderr.write(result.stdout[-3000:] + result.stderr[-3000:])
        raise SystemExit(f"{program} failed with exit status {result.returncode}")
    return result.stdout, wall


def probe_run(args, name: str, checkpoint: str, out: Path, env: dict, extra=()) -> dict:
    run_dir = out / name
    argv = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "28",
            "--model", args.model, "--finetune", checkpoint, "--global_pool",
            "--epochs", str(args.epochs), "--warmup_epochs", "0", "--blr", str(args.blr), "--weight_decay", "0.0",
            "--batch_size", str(args.batch_size), "--max_train_images", str(args.probe_images),
            "--num_workers", str(args.num_workers), "--device", args.device, "--seed", str(args.seed),
            "--output_dir", str(run_dir), "--log_dir", "", "--save_freq", "1000", *extra]
    stdout, wall = run("main_linprobe.py", argv, env)
    epochs = [float(s) for s in re.findall(r"^epoch \d+ took ([0-9.]+) s", stdout, re.M)]
    cached = re.search(r"^cached the features of .* in ([0-9.]+) s", stdout, re.M)
    return {
        "command": "python main_linprobe.py " + " ".join(argv),
        "epoch_times_s": epochs,
        "epoch_time_s": statistics.median(epochs),
        "feature_extraction_s": float(cached.group(1)) if cached else None,
        "wall_s": wall,
        "top1": final_test_accuracy(run_dir / "log.txt"),
    }


def pretrain(args, out: Path, env: dict) -> tuple[str, str]:
    run_dir = out / "pretrain"
    argv = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "28",
            "--model", "mae_" + args.model, "--mask_ratio", "0.75", "--norm_pix_loss",
            "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "1", "--blr", "1.5e-4",
            "--batch_size", str(args.batch_size), "--max_train_images", str(args.pretrain_images),
            "--num_workers", str(args.num_workers), "--device", args.device, "--seed", str(args.seed),
            "--output_dir", str(run_dir), "--log_dir", "", "--vis_freq", "0", "--save_freq", "1000"]
    run("main_pretrain.py", argv, env)
    return str(run_dir / "checkpoint-last.pth"), "python main_pretrain.py " + " ".join(argv)


def measure(args, out: Path) -> dict:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    report = {}
    checkpoint = args.checkpoint
    if not checkpoint:
        checkpoint, report["pretrain_command"] = pretrain(args, out, env)
    standard = probe_run(args, "standard", checkpoint, out, env)
    cached = probe_run(args, "cached", checkpoint, out, env, extra=["--cache_features"])
    if args.unaugmented:
        unaugmented = probe_run(args, "unaugmented", checkpoint, out, env, extra=["--no_train_augmentation"])
        report["unaugmented"] = unaugmented
        report["top1_difference_unaugmented"] = cached["top1"] - unaugmented["top1"]
    saved = standard["epoch_time_s"] - cached["epoch_time_s"]
    report.update({
        "checkpoint": checkpoint,
        "standard": standard,
        "cached": cached,
        "speedup_per_epoch": standard["epoch_time_s"] / cached["epoch_time_s"],
        "break_even_epochs": cached["feature_extraction_s"] / saved if saved > 0 else None,
        "top1_difference": cached["top1"] - standard["top1"],
    })
    return report


def format_table(report: dict) -> str:
    a = report["args"]
    lines = [f"{report['device']}, {report['date']}, OMP_NUM_THREADS={a['threads'] or os.environ.get('OMP_NUM_THREADS')}",
             f"{a['model']} probe on Fashion-MNIST ({a['probe_images'] or 60000} training images, 10000 test), "
             f"{a['epochs']} epochs, batch {a['batch_size']}, blr {a['blr']}",
             f"{'probe':<10}{'s/epoch':>9}{'one-time s':>12}{'total s':>9}{'top-1':>8}"]
    for name in ("standard", "cached", "unaugmented"):
        if name not in report:
            continue
        r = report[name]
        once = f"{r['feature_extraction_s']:.1f}" if r["feature_extraction_s"] is not None else "-"
        lines.append(f"{name:<10}{r['epoch_time_s']:>9.2f}{once:>12}{r['wall_s']:>9.1f}{r['top1']:>8.2f}")
    lines.append(f"per-epoch speedup {report['speedup_per_epoch']:.1f}x; accuracy difference (cached - standard) "
                 f"{report['top1_difference']:+.2f} points")
    if "unaugmented" in report:
        lines.append(f"accuracy difference (cached - unaugmented standard, the same images) "
                     f"{report['top1_difference_unaugmented']:+.2f} points")
    if report["break_even_epochs"] is not None:
        lines.append(f"the feature cache pays for itself after {report['break_even_epochs']:.1f} epochs")
    return "\n".join(lines)


def main(args) -> dict:
    report = {**machine(), "device": cpu_model()}
    report["args"] = dict(vars(args))
    if args.output_dir:
        report.update(measure(args, Path(args.output_dir)))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_linprobe_") as tmp:
            report.update(measure(args, Path(tmp)))
    print(format_table(report))
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
