"""End-to-end MAE on real data: pretrain, then judge the encoder against the same encoder from random init.

    python demo.py                       # what `make demo` runs: Fashion-MNIST, about 10 minutes on 2 CPU cores

Stages: MAE pretraining of ``mae_vit_micro_patch4`` (figures in ``pretrain/``), then a linear probe and a fine-tuning
of its encoder and, on the same budget, of the same encoder from random init; the four final test accuracies go to
``results.md`` and ``results.json``. Each stage is one of the package's programs, run with a printed command line."""
import json
import os
import shlex
import time

import main_finetune
import main_linprobe
import main_pretrain
from util.cli import Parser, count, default_device, run
from util.datasets import DEBIAN_FASHION_MNIST_DIR
from util.logger import final_test_accuracy
from util.targets import TARGETS


def get_args_parser():
    parser = Parser("MAE demo on Fashion-MNIST: pretraining, then probing and fine-tuning vs random init")
    g = parser.add_argument_group("data and output")
    g.add_argument("--data_path", default=DEBIAN_FASHION_MNIST_DIR,
                   help="directory with Fashion-MNIST's idx files (Debian: apt-get install dataset-fashion-mnist)")
    g.add_argument("--download", action="store_true", help="download Fashion-MNIST with torchvision (needs internet)")
    g.add_argument("--output_dir", default="demo_output", help="one sub-directory per stage, plus results.md/json")
    g.add_argument("--device", default=default_device())
    g.add_argument("--num_workers", default=1, type=count(0))
    g.add_argument("--seed", default=0, type=int)
    g = parser.add_argument_group("budget (defaults: about 10 minutes on 2 CPU cores)")
    g.add_argument("--model", default="mae_vit_micro_patch4",
                   help="MAE model to pretrain; its classifier twin (without 'mae_') is probed and fine-tuned")
    g.add_argument("--pretrain_epochs", default=3, type=count(1))
    g.add_argument("--pretrain_images", default=0, type=count(0), metavar="N", help="first N training images (0: all)")
    g.add_argument("--probe_epochs", default=30, type=count(1), help="epochs of the head on cached features (cheap)")
    g.add_argument("--finetune_epochs", default=1, type=count(1))
    g.add_argument("--downstream_images", default=20000, type=count(0), metavar="N",
                   help="first N training images for probing and fine-tuning (0: all)")
    g.add_argument("--batch_size", default=128, type=count(1))
    g.add_argument("--no_random_init", action="store_false", dest="random_init",
                   help="skip the random-init stages, which do not depend on the pretraining (e.g. comparing targets)")
    g = parser.add_argument_group("pretraining target (see main_pretrain.py --help)")
    g.add_argument("--target", default="norm_pixel", choices=TARGETS, help="the decoder's target (default %(default)s)")
    g.add_argument("--teacher_checkpoint", default="", metavar="FILE",
                   help="--target teacher: a frozen teacher, e.g. another demo's pretrain/checkpoint-last.pth")
    return parser


def stage_commands(args) -> dict:
    """Each stage as (program module, its command line). Same budget and seed for both initialisations."""
    out = args.output_dir
    common = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "28",
              "--device", args.device, "--num_workers", str(args.num_workers), "--seed", str(args.seed),
              "--batch_size", str(args.batch_size)] + (["--download"] if args.download else [])
    classifier = args.model.removeprefix("mae_")
    pretrained = os.path.join(out, "pretrain", "checkpoint-last.pth")

    def stage(name, extra):
        return ["--output_dir", os.path.join(out, name), "--log_dir", os.path.join(out, name)] + common + extra

    pretrain = stage("pretrain", [
        "--model", args.model, "--target", args.target, "--mask_ratio", "0.75", "--epochs", str(args.pretrain_epochs),
        "--warmup_epochs", "1", "--blr", "1.5e-4", "--max_train_images", str(args.pretrain_images), "--vis_freq", "1",
        "--save_freq", "1000"] + (["--teacher_checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []))
    downstream = ["--model", classifier, "--max_train_images", str(args.downstream_images), "--save_freq", "1000"]
    # Probe the mean patch token: a few MAE epochs give the class token little reason to summarise the image (the
    # paper probes it after 800+). Cached features make many epochs cheap. LARS moves a weight by about lr x 0.001 of
    # its norm per step: a short run at batch 128 needs more than the original's lr (6.4 at batch 16384, 90 epochs).
    probe = downstream + ["--global_pool", "--cache_features", "--epochs", str(args.probe_epochs),
                          "--warmup_epochs", "1", "--lr", "16", "--weight_decay", "0.0"]
    # A short schedule: light augmentation (no RandAugment, erasing or mixup), no warmup, no drop path.
    finetune = downstream + ["--epochs", str(args.finetune_epochs), "--warmup_epochs", "0", "--blr", "4e-3",
                             "--layer_decay", "0.75", "--weight_decay", "0.05", "--drop_path", "0.0",
                             "--aa", "none", "--reprob", "0.0", "--smoothing", "0.1"]
    stages = {"pretrain": (main_pretrain, pretrain)}
    for protocol, program, argv in (("linprobe", main_linprobe, probe), ("finetune", main_finetune, finetune)):
        stages[f"{protocol}_pretrained"] = (program, stage(f"{protocol}_pretrained", argv + ["--finetune", pretrained]))
        if args.random_init:
            stages[f"{protocol}_random"] = (program, stage(f"{protocol}_random", argv))
    return stages


def main(args):
    seconds, accuracy = {}, {}
    for name, (program, argv) in stage_commands(args).items():
        print(f"\n=== {name}: python {program.__name__}.py {shlex.join(argv)}", flush=True)
        start = time.perf_counter()
        program.main(program.get_args_parser().parse_args(argv))
        seconds[name] = time.perf_counter() - start
        if name != "pretrain":
            accuracy[name] = final_test_accuracy(os.path.join(args.output_dir, name, "log.txt"))
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)

    rows = ["| encoder | linear probe | fine-tune |", "|---|---:|---:|"]
    for label, key in (("MAE pretrained", "pretrained"), ("random init", "random")):
        if "linprobe_" + key in accuracy:
            rows.append(f"| {label} | {accuracy['linprobe_' + key]:.2f} % | {accuracy['finetune_' + key]:.2f} % |")
    table = "\n".join(rows)
    summary = (f"Fashion-MNIST test top-1 after {args.probe_epochs} probe / {args.finetune_epochs} fine-tuning "
               f"epoch(s) on {args.downstream_images or 'all'} images; encoder {args.model} pretrained for "
               f"{args.pretrain_epochs} epoch(s) on {args.pretrain_images or 'all'} images ({args.target} target); "
               f"{sum(seconds.values()) / 60:.1f} min on {args.device}")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + summary + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"accuracy": accuracy, "seconds": seconds, "args": vars(args)}, f, indent=1)
    print("\n" + table + "\n\n" + summary)
    print(f"figures: {os.path.join(args.output_dir, 'pretrain', 'vis')}, "
          f"loss curve: {os.path.join(args.output_dir, 'pretrain', 'loss_curve.png')}")


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
