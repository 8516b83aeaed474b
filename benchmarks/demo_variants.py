"""Some of the demo's stages again, with a change to their command lines: how the demo's recipe was chosen.

    python benchmarks/demo_variants.py --output_dir runs/variants/ld70 --pretraining_from demo_output \
        --stages finetune_pretrained finetune_random --stage_args="--layer_decay 0.7"
    python benchmarks/demo_variants.py --output_dir runs/variants/mask50 --stages pretrain linprobe_pretrained \
        finetune_pretrained -- --mask_ratio 0.5

Arguments after ``--`` are demo.py's (budget, pretraining recipe); ``--stage_args`` is appended to each chosen
stage's command line, so it overrides the demo's flag of the same name (e.g. main_finetune.py's ``--layer_decay``).
Stages that start from the pretrained encoder read it from ``--pretraining_from`` (a finished demo's output
directory, linked, never written) unless ``pretrain`` is among the stages. Writes ``variant.json`` and prints one
table row: the test accuracy of each stage run, with the machine and the command.
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import demo  # noqa: E402
from benchmarks.common import machine, write_json  # noqa: E402
from util.cli import run  # noqa: E402
from util.errors import UserError  # noqa: E402

STAGES = tuple(demo.stage_commands(demo.get_args_parser().parse_args([])))  # the demo's names, in its order


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--stages", nargs="+", required=True, choices=STAGES)
    parser.add_argument("--stage_args", default="", help="appended to every chosen stage's command line")
    parser.add_argument("--pretraining_from", default="", metavar="DEMO_OUTPUT_DIR",
                        help="a finished demo whose pretrain/checkpoint-last.pth the pretrained stages start from")
    parser.add_argument("demo_argv", nargs=argparse.REMAINDER, help="after --: demo.py's flags")
    return parser


def main(args):
    demo_argv = [a for a in args.demo_argv if a != "--"]
    demo_args = demo.get_args_parser().parse_args(demo_argv + ["--output_dir", args.output_dir])
    link = os.path.join(args.output_dir, "pretrain")
    if "pretrain" in args.stages:
        if args.pretraining_from or os.path.islink(link):  # pretraining must not write into another demo's run
            raise UserError(f"'pretrain' is among --stages: it pretrains into {link}, so give no --pretraining_from "
                            f"and an --output_dir without a linked pretrain/")
    elif any(stage.endswith("_pretrained") for stage in args.stages):
        source = os.path.join(args.pretraining_from, "pretrain")
        if not (args.pretraining_from and os.path.isfile(os.path.join(source, "checkpoint-last.pth"))):
            raise UserError(f"the *_pretrained stages need an encoder: add 'pretrain' to --stages or pass "
                            f"--pretraining_from a demo output directory with pretrain/checkpoint-last.pth "
                            f"(got {args.pretraining_from or 'none'})")
        os.makedirs(args.output_dir, exist_ok=True)
        if os.path.realpath(link) != os.path.realpath(source):
            if os.path.lexists(link):
                raise UserError(f"{link} exists and is not {source}: choose another --output_dir")
            os.symlink(os.path.abspath(source), link)
    demo.find_fashion_mnist(demo_args.data_path)
    extra = shlex.split(args.stage_args)
    stages = {name: (program, argv + extra) for name, (program, argv) in demo.stage_commands(demo_args).items()
              if name in args.stages}
    seconds, accuracy = demo.run_stages(stages, args.output_dir)

    command = shlex.join(["python", "benchmarks/demo_variants.py", *sys.argv[1:]])
    row = " | ".join(f"{name} {accuracy[name]:.2f} %" for name in accuracy)
    write_json({"accuracy": accuracy, "seconds": seconds, "stage_args": extra, "demo_args": vars(demo_args),
                "command": command, "machine": machine()}, os.path.join(args.output_dir, "variant.json"))
    print(f"\n| {args.stage_args or ' '.join(demo_argv) or 'the demo'} | {row} |\n{command}")


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
