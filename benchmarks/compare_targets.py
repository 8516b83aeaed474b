"""Pixel vs normalised pixel vs HOG vs teacher targets, each followed by the demo's linear probe and fine-tuning.

    python benchmarks/compare_targets.py --output_dir runs/targets        # 4 demo runs: about 40 min on 2 CPU cores

Every run is ``demo.py`` with one ``--target`` and otherwise the same budget. The teacher is the encoder of the
pixel run (a two-stage self-supervised distillation: no labels reach the teacher), so the pixel run precedes it.
Extra arguments after ``--`` go to every demo run (e.g. ``-- --pretrain_epochs 1`` for a quick look).
Writes ``targets.md`` and ``targets.json`` in the output directory; a target whose run already finished there
(its ``results.json`` exists) is reused, so an interrupted comparison continues where it stopped.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

import demo  # noqa: E402

# the default target first: its run, with the random-init stages, is the full demo (and its timing)
TARGETS = ("norm_pixel", "pixel", "hog", "teacher")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", default="runs/targets")
    parser.add_argument("--targets", nargs="+", default=list(TARGETS), choices=TARGETS)
    args, demo_argv = parser.parse_known_args()
    demo_argv = [a for a in demo_argv if a != "--"]
    if "teacher" in args.targets and "pixel" not in args.targets:
        parser.error("the teacher is the pixel run's encoder: keep 'pixel' in --targets")
    targets = sorted(args.targets, key=TARGETS.index)  # pixel before teacher

    results = {}
    for target in targets:
        out = os.path.join(args.output_dir, target)
        argv = demo_argv + ["--output_dir", out, "--target", target]
        if target != targets[0]:
            argv.append("--no_random_init")  # the random-init stages do not depend on the target: run them once
        if target == "teacher":
            argv += ["--teacher_checkpoint", os.path.join(args.output_dir, "pixel", "pretrain", "checkpoint-last.pth")]
        if os.path.exists(os.path.join(out, "results.json")):  # finished earlier (an interrupted comparison)
            print(f"reusing the finished run in {out}")
        else:
            demo.main(demo.get_args_parser().parse_args(argv))
        with open(os.path.join(out, "results.json")) as f:
            results[target] = json.load(f)

    lines = ["| target | linear probe (pretrained) | fine-tune (pretrained) | pretraining s | total s |",
             "|---|---:|---:|---:|---:|"]
    for target, r in results.items():
        acc, sec = r["accuracy"], r["seconds"]
        lines.append(f"| {target} | {acc['linprobe_pretrained']:.2f} % | {acc['finetune_pretrained']:.2f} % | "
                     f"{sec['pretrain']:.0f} | {sum(sec.values()):.0f} |")
    baseline = next(iter(results.values()))["accuracy"]
    lines.append(f"| random init (same budget) | {baseline['linprobe_random']:.2f} % | "
                 f"{baseline['finetune_random']:.2f} % | – | – |")
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    footer = (f"{datetime.date.today()}, {machine}; command: python benchmarks/compare_targets.py "
              f"--output_dir {args.output_dir} {' '.join(demo_argv)}".rstrip())
    table = "\n".join(lines) + "\n\n" + footer + "\n"
    with open(os.path.join(args.output_dir, "targets.md"), "w") as f:
        f.write(table)
    with open(os.path.join(args.output_dir, "targets.json"), "w") as f:
        json.dump(results, f, indent=1)
    print("\n" + table)


if __name__ == "__main__":
    main()
