"""End-to-end MAE on real data: pretrain, then judge the encoder against the same encoder from random init.

    python demo.py                       # what `make demo` runs: Fashion-MNIST, about 10 minutes on 2 CPU cores

Four stages after pretraining, each with the same budget for both initialisations:

    1. MAE pretraining of a small ViT (``mae_vit_micro_patch4``) on the training images,
       writing reconstruction figures (``pretrain/vis/``) and the loss curve (``pretrain/loss_curve.png``);
    2. linear probe of the frozen encoder: pretrained vs random init;
    3. fine-tuning of the whole encoder: pretrained vs random init;
    4. a table of the four test accuracies (final epoch, Fashion-MNIST's 10 000 test images), also written to
       ``results.md`` and ``results.json``.

Each stage is the package's own program (``main_pretrain``, ``main_linprobe``, ``main_finetune``) called with a
command line that is printed before it runs, so any stage can be rerun or scaled up by hand.
"""
from __future__ import annotations

import json
import os
import shlex
import time


import main_finetune
import main_linprobe
import main_pretrain
from util.cli import Parser, default_device, run
from util.datasets import DEBIAN_FASHION_MNIST_DIR
from util.logger import final_test_accuracy


def get_args_parser():
    parser = Parser("MAE end-to-end demo on Fashion-MNIST: pretraining, then linear probe and fine-tuning of the "
                    "pretrained encoder against random init", add_help=True)
    g = parser.add_argument_group("data and output")
    g.add_argument("--data_path", default=DEBIAN_FASHION_MNIST_DIR,
                   help="directory with Fashion-MNIST's idx files (Debian: apt-get install dataset-fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision (needs internet)")
    g.add_argument("--output_dir", default="demo_output", help="one sub-directory per stage, plus results.md/json")
    g.add_argument("--device", default=default_device())
    g.add_argument("--num_workers", default=1, type=int)
    g.add_argument("--seed", default=0, type=int)
    g = parser.add_argument_group("budget (defaults: about 10 minutes on 2 CPU cores)")
    g.add_argument("--model", default="mae_vit_micro_patch4",
                   help="MAE model to pretrain; its classifier twin (without 'mae_') is probed and fine-tuned")
    g.add_argument("--pretrain_epochs", default=3, type=int)
    g.add_argument("--pretrain_images", default=0, type=int, metavar="N", help="first N training images (0: all)")
    g.add_argument("--probe_epochs", default=30, type=int, help="epochs of the head on cached features (cheap)")
    g.add_argument("--finetune_epochs", default=1, type=int)
    g.add_argument("--downstream_images", default=20000, type=int, metavar="N",
                   help="first N training images for probing and fine-tuning (0: all)")
    g.add_argument("--batch_size", default=128, type=int)
    g.add_argument("--no_random_init", action="store_false", dest="random_init",
                   help="skip the two random-init stages (they do not depend on the pretraining, e.g. when "
                        "comparing targets)")
    g = parser.add_argument_group("pretraining target (see main_pretrain.py --help)")
    g.add_argument("--target", default="norm_pixel", choices=("pixel", "norm_pixel", "hog", "teacher"),
                   help="what the decoder predicts for the removed patches (default: normalised pixels)")
    g.add_argument("--teacher_checkpoint", default="", metavar="FILE",
                   help="--target teacher: a frozen teacher, e.g. another demo's pretrain/checkpoint-last.pth")
    return parser


def stage_commands(args) -> dict[str, tuple[object, list[str]]]:
    """Each stage as (program module, its command line). Same budget and seed for both initialisations."""
    out = args.output_dir
    common = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "28",
              "--device", args.device, "--num_workers", str(args.num_workers), "--seed", str(args.seed),
              "--batch_size", str(args.batch_size)]
    if args.download:
        common.append("--download")
    classifier = args.model.removeprefix("mae_")
    pretrained = os.path.join(out, "pretrain", "checkpoint-last.pth")

    def stage(name, extra):
        return ["--output_dir", os.path.join(out, name), "--log_dir", os.path.join(out, name)] + common + extra

    pretrain = stage("pretrain", [
        "--model", args.model, "--target", args.target, "--mask_ratio", "0.75",
        "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "1", "--blr", "1.5e-4",
        "--max_train_images", str(args.pretrain_images), "--vis_freq", "1", "--save_freq", "1000"]
        + (["--teacher_checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []))
    downstream = ["--model", classifier, "--max_train_images", str(args.downstream_images), "--save_freq", "1000"]
    # Probe on the mean of the patch tokens: after a few epochs of MAE the class token has had little reason to
    # summarise the image (the paper's probe uses it after 800+ epochs). Features are cached (the encoder runs
    # once), so many cheap epochs fit the budget. LARS changes a weight by about lr x 0.001 of its norm per step:
    # the original's lr (6.4 at batch 16384, 90 epochs) needs to be larger for a short run at batch 128.
    probe = downstream + ["--global_pool", "--cache_features", "--epochs", str(args.probe_epochs),
                          "--warmup_epochs", "1", "--lr", "16", "--weight_decay", "0.0"]
    # A short schedule: light augmentation (no RandAugment, erasing or mixup), no warmup, no drop path.
    finetune = downstream + ["--epochs", str(args.finetune_epochs), "--warmup_epochs", "0", "--blr", "4e-3",
                             "--layer_decay", "0.75", "--weight_decay", "0.05", "--drop_path", "0.0",
                             "--aa", "none", "--reprob", "0.0", "--smoothing", "0.1"]
    stages = {
        "pretrain": (main_pretrain, pretrain),
        "linprobe_pretrained": (main_linprobe, stage("linprobe_pretrained", probe + ["--finetune", pretrained])),
        "linprobe_random": (main_linprobe, stage("linprobe_random", probe)),
        "finetune_pretrained": (main_finetune, stage("finetune_pretrained", finetune + ["--finetune", pretrained])),
        "finetune_random": (main_finetune, stage("finetune_random", finetune)),
    }
    if not args.random_init:
        del stages["linprobe_random"], stages["finetune_random"]
    return stages


def results_table(acc: dict[str, float]) -> str:
    rows = [("MAE pretrained", "pretrained"), ("random init", "random")]
    lines = ["| encoder | linear probe | fine-tune |", "|---|---:|---:|"]
    for label, key in rows:
        if "linprobe_" + key not in acc:
            continue
        lines.append(f"| {label} | {acc['linprobe_' + key]:.2f} % | {acc['finetune_' + key]:.2f} % |")
    return "\n".join(lines)


def main(args):
    os.makedirs(args.output_dir, exist_ok=True)
    seconds, accuracy = {}, {}
    for name, (program, argv) in stage_commands(args).items():
        print(f"\n=== {name}: python {program.__name__}.py {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        program.main(program.get_args_parser().parse_args(argv))
        seconds[name] = time.perf_counter() - start
        if name != "pretrain":
            accuracy[name] = final_test_accuracy(os.path.join(args.output_dir, name, "log.txt"))
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)

    table = results_table(accuracy)
    total = sum(seconds.values())
    summary = (f"Fashion-MNIST test top-1 after {args.probe_epochs} probe / {args.finetune_epochs} fine-tuning "
               f"epoch(s) on {args.downstream_images or 'all'} images; encoder {args.model} pretrained for "
               f"{args.pretrain_epochs} epoch(s) on {args.pretrain_images or 'all'} images ({args.target} target); "
               f"{total / 60:.1f} min on {args.device}")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + summary + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"accuracy": accuracy, "seconds": seconds, "args": vars(args)}, f, indent=1)
    print("\n" + table + "\n\n" + summary)
    print(f"figures: {os.path.join(args.output_dir, 'pretrain', 'vis')}, "
          f"loss curve: {os.path.join(args.output_dir, 'pretrain', 'loss_curve.png')}")


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
