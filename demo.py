"""End-to-end MAE on real data: pretrain, then judge the encoder against the same encoder from random init and
against a linear classifier on the raw pixels.

    python demo.py                       # what `make demo` runs: Fashion-MNIST, 7-11 minutes on 2 idle CPU cores

Stages: MAE pretraining of ``mae_vit_mini_patch7`` with the kNN monitor (figures in ``pretrain/``); a linear probe
and a fine-tuning of its encoder and, on the same budget, of the same encoder from random init; the probe's head
and schedule on the raw pixels. The final test accuracies go to ``results.md`` and ``results.json``. Each stage
is one of the package's programs, run with a printed command line (the pixel baseline: main_linprobe.py's pieces)."""
import os

# The loader worker shares the two cores with torch's OpenMP threads, which by default spin while they wait and take
# its CPU time: passive waiting made a pretraining step 15 % faster here (BENCHMARKS.md §8). Set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from timm.optim import Lars  # noqa: E402
from torchvision.datasets import FashionMNIST  # noqa: E402

import main_finetune  # noqa: E402
import main_linprobe  # noqa: E402
import main_pretrain  # noqa: E402
from engine import evaluate, train_one_epoch  # noqa: E402
from util.amp import AMP_CHOICES, GradientUpdater, resolve_amp  # noqa: E402
from util.cli import Parser, count, default_device, run  # noqa: E402
from util.datasets import DEBIAN_FASHION_MNIST_DIR, build_dataset, dataset_info  # noqa: E402
from util.errors import UserError, one_line  # noqa: E402
from util.figures import read_log  # noqa: E402
from util.logger import final_test_accuracy, write_log_line  # noqa: E402
from util.lr_sched import set_effective_lr  # noqa: E402
from util.runtime import compile_unavailable, setup_run  # noqa: E402
from util.targets import TARGETS  # noqa: E402


def get_args_parser():
    parser = Parser("MAE demo on Fashion-MNIST: pretraining, then probing and fine-tuning vs random init and pixels")
    g = parser.add_argument_group("data and output")
    g.add_argument("--data_path", default="data", help="Fashion-MNIST's idx files: here, else Debian's package "
                   f"({DEBIAN_FASHION_MNIST_DIR}), else downloaded here (needs internet)")
    g.add_argument("--output_dir", default="demo_output", help="one sub-directory per stage, plus results.md/json")
    g.add_argument("--device", default=default_device())
    g.add_argument("--num_workers", default=1, type=count(0))
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--amp", default=None, choices=AMP_CHOICES,
                   help="precision of every stage (default: bf16 where the CPU or GPU has bf16 units, else none)")
    g.add_argument("--compile", default=None, action=argparse.BooleanOptionalAction,
                   help="torch.compile the pretraining (default: where it can, i.e. with a C++ compiler and Python.h)")
    g = parser.add_argument_group("budget (defaults: about 7 min on 2 idle CPU cores with bf16 units, 11 without)")
    g.add_argument("--model", default="mae_vit_mini_patch7",
                   help="MAE model to pretrain; its classifier twin (without 'mae_') is probed and fine-tuned")
    g.add_argument("--pretrain_epochs", default=7, type=count(1))
    g.add_argument("--blr", default=1.5e-3, type=float, help="pretraining base lr (lr = blr x batch / 256)")
    g.add_argument("--mask_ratio", default=0.75, type=float)
    g.add_argument("--pretrain_images", default=0, type=count(0), metavar="N", help="first N training images (0: all)")
    g.add_argument("--knn_train_images", default=5000, type=count(1), metavar="N",
                   help="memory bank of the kNN monitor, printed every pretraining epoch")
    g.add_argument("--probe_epochs", default=30, type=count(1), help="epochs of the head on cached features (cheap)")
    g.add_argument("--finetune_epochs", default=5, type=count(1))
    g.add_argument("--finetune_blr", default=1e-2, type=float, help="fine-tuning base lr (lr = blr x batch / 256)")
    g.add_argument("--finetune_batch_size", default=64, type=count(1))
    g.add_argument("--downstream_images", default=5000, type=count(0), metavar="N",
                   help="first N training images, with their labels, for probing and fine-tuning (0: all)")
    g.add_argument("--batch_size", default=128, type=count(1), help="of pretraining and probing")
    g.add_argument("--no_random_init", action="store_false", dest="random_init",
                   help="skip the random-init stages, which do not depend on the pretraining (e.g. comparing targets)")
    g = parser.add_argument_group("pretraining target (see main_pretrain.py --help)")
    g.add_argument("--target", default="norm_pixel", choices=TARGETS, help="the decoder's target (default %(default)s)")
    g.add_argument("--teacher_checkpoint", default="", metavar="FILE",
                   help="--target teacher: a frozen teacher, e.g. another demo's pretrain/checkpoint-last.pth")
    return parser


def find_fashion_mnist(data_path: str) -> None:
    """Fashion-MNIST in ``data_path`` or Debian's package, else downloaded into ``data_path``; else one line."""
    try:
        for split in ("train", "val"):
            build_dataset(split, argparse.Namespace(dataset="fashion_mnist", data_path=data_path, input_size=28))
    except UserError:
        try:
            for train in (True, False):
                FashionMNIST(data_path, train=train, download=True)  # into DATA_PATH/FashionMNIST/raw, searched
        except (OSError, RuntimeError) as e:
            raise UserError(f"Fashion-MNIST is neither in {data_path} nor in {DEBIAN_FASHION_MNIST_DIR}, and "
                            f"downloading it failed ({one_line(e)}): apt-get install dataset-fashion-mnist (Debian), "
                            f"or put its idx files in {data_path}") from None


def stage_commands(args) -> dict:
    """Each stage as (program module, its command line). Same budget, seed and precision for every initialisation.
    The host's precision (bf16 where it has bf16 units) and a compiled pretraining make the budget's 7 pretraining
    epochs fit: both together halve a pretraining step on a 2-core AVX512-BF16 CPU, and bf16 halves a fine-tuning
    epoch, with the same accuracies to about 0.3 point (BENCHMARKS.md §9)."""
    out = args.output_dir
    args.amp = resolve_amp(args.amp, torch.device(args.device))  # resolved here, so the printed commands show it
    args.compile = compile_unavailable() is None if args.compile is None else args.compile
    common = ["--dataset", "fashion_mnist", "--data_path", args.data_path, "--input_size", "28", "--amp", args.amp,
              "--device", args.device, "--num_workers", str(args.num_workers), "--seed", str(args.seed)]
    classifier = args.model.removeprefix("mae_")
    pretrained = os.path.join(out, "pretrain", "checkpoint-last.pth")

    def stage(name, extra):
        return ["--output_dir", os.path.join(out, name), "--log_dir", os.path.join(out, name), "--overwrite"] \
            + common + extra  # a demo run again starts afresh

    pretrain = stage("pretrain", [
        "--model", args.model, "--batch_size", str(args.batch_size), "--target", args.target, "--mask_ratio",
        str(args.mask_ratio), "--epochs", str(args.pretrain_epochs), "--warmup_epochs", "1", "--blr", str(args.blr),
        "--max_train_images", str(args.pretrain_images), "--vis_freq", "1", "--save_freq", "1000",
        "--knn_freq", "1", "--knn_train_images", str(args.knn_train_images)]
        + (["--compile"] if args.compile else [])
        + (["--teacher_checkpoint", args.teacher_checkpoint] if args.teacher_checkpoint else []))
    # Pretraining reads all the training images without labels; the downstream stages get the labels of only the first
    # 5 000 by default: scarce labels are where pretraining pays (with 20 000, random init fine-tunes to 5.5 points
    # below the pretrained encoder).
    downstream = ["--model", classifier, "--max_train_images", str(args.downstream_images), "--save_freq", "1000"]
    # Probe the mean patch token: a few MAE epochs give the class token little reason to summarise the image (the
    # paper probes it after 800+). Cached features make many epochs cheap. LARS moves a weight by about lr x 0.001 of
    # its norm per step: a short run at batch 128 needs more than the original's lr (6.4 at batch 16384, 90 epochs).
    probe = downstream + ["--batch_size", str(args.batch_size), "--global_pool", "--cache_features", "--epochs",
                          str(args.probe_epochs), "--warmup_epochs", "1", "--lr", "16", "--weight_decay", "0.0"]
    # The original's fine-tuning regularisation (mixup 0.8, cutmix 1.0, label smoothing 0.1, layer decay 0.65) on a
    # short schedule: no warmup, flips only. Random erasing and drop path each cost the pretrained encoder 0.3-1 point
    # at this length; RandAugment is not used. Fashion-MNIST's items are centred and the test images are not shifted:
    # with the small-image default of 3-px shifted crops, fine-tuning ends several points lower. Five epochs: more let
    # random init catch up (10 epochs: 7.5 points behind instead of 10), fewer leave fine-tuning under the probe
    # (BENCHMARKS.md §9). One evaluation, after the last epoch (the table's figure): evaluating the 10 000 test images
    # costs about half a training epoch here.
    finetune = downstream + ["--epochs", str(args.finetune_epochs), "--eval_freq", str(args.finetune_epochs),
                             "--warmup_epochs", "0", "--batch_size", str(args.finetune_batch_size),
                             "--blr", str(args.finetune_blr), "--layer_decay", "0.65", "--weight_decay", "0.05",
                             "--drop_path", "0.0", "--crop_padding", "0", "--aa", "none", "--reprob", "0.0",
                             "--smoothing", "0.1", "--mixup", "0.8", "--cutmix", "1.0"]
    stages = {"pretrain": (main_pretrain, pretrain)}
    for protocol, program, argv in (("linprobe", main_linprobe, probe), ("finetune", main_finetune, finetune)):
        stages[f"{protocol}_pretrained"] = (program, stage(f"{protocol}_pretrained", argv + ["--finetune", pretrained]))
        if args.random_init:
            stages[f"{protocol}_random"] = (program, stage(f"{protocol}_random", argv))
    stages["linprobe_pixels"] = (main_linprobe, stage("linprobe_pixels", probe))  # run by probe_pixels
    return stages


class Pixels(torch.nn.Module):
    """Stands in for an encoder in ``main_linprobe.cached_feature_loaders``: an image's features are its pixels."""

    def forward_features(self, images):
        return images

    def forward_head(self, images, pre_logits=True):
        return images.flatten(1)


def probe_pixels(args) -> None:
    """main_linprobe.py's head (BatchNorm + Linear), LARS and schedule on the normalised pixels of the same images:
    a linear classifier without an encoder, the baseline that a pretrained encoder's features must beat."""
    device = setup_run(args)
    train_loader, val_loader = main_linprobe.cached_feature_loaders(Pixels(), args, device)
    pixels = train_loader.dataset.tensors[0].shape[1]
    classes = dataset_info(args).num_classes
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(pixels, affine=False, eps=1e-6), torch.nn.Linear(pixels, classes))
    torch.nn.init.trunc_normal_(head[1].weight, std=0.01)  # as main_linprobe's head after load_pretrained
    torch.nn.init.zeros_(head[1].bias)
    set_effective_lr(args, 1)
    optimizer = Lars(main_linprobe.lars_param_groups(head, args.weight_decay), lr=args.lr, momentum=0.9,
                     trust_coeff=0.001, eps=0.0)
    updater = GradientUpdater(args.amp, device)
    for epoch in range(args.epochs):
        train_loader.sampler.set_epoch(epoch)
        train_stats = train_one_epoch(head.to(device), train_loader, optimizer, device, epoch, updater, args,
                                      criterion=torch.nn.CrossEntropyLoss())
    write_log_line(args.output_dir, epoch, train_stats, evaluate(val_loader, head, device, args))


def run_stages(stages: dict, output_dir: str) -> tuple[dict, dict]:
    """Run ``stage_commands``' stages in order, each command printed first: (seconds, test accuracy) per stage."""
    seconds, accuracy = {}, {}
    for name, (program, argv) in stages.items():
        run_stage = probe_pixels if name == "linprobe_pixels" else program.main
        command = f"{program.__name__}.py {shlex.join(argv)}"
        shown = f"demo.probe_pixels({command})" if run_stage is probe_pixels else f"python {command}"
        print(f"\n=== {name}: {shown}", flush=True)
        start = time.perf_counter()
        run_stage(program.get_args_parser().parse_args(argv))
        seconds[name] = time.perf_counter() - start
        if name != "pretrain":
            accuracy[name] = final_test_accuracy(os.path.join(output_dir, name, "log.txt"))
        print(f"=== {name}: {seconds[name]:.0f} s", flush=True)
    return seconds, accuracy


def main(args):
    find_fashion_mnist(args.data_path)
    seconds, accuracy = run_stages(stage_commands(args), args.output_dir)
    knn = [r["knn_acc1"] for r in read_log(os.path.join(args.output_dir, "pretrain", "log.txt")) if "knn_acc1" in r]

    rows = ["| features | linear probe | fine-tune |", "|---|---:|---:|"]
    for label, key in (("MAE-pretrained encoder", "pretrained"), ("random-init encoder", "random"),
                       ("raw pixels (no encoder)", "pixels")):
        if "linprobe_" + key in accuracy:
            finetuned = f"{accuracy['finetune_' + key]:.2f} %" if "finetune_" + key in accuracy else "—"
            rows.append(f"| {label} | {accuracy['linprobe_' + key]:.2f} % | {finetuned} |")
    table = "\n".join(rows)
    summary = (f"Fashion-MNIST test top-1 after {args.probe_epochs} probe / {args.finetune_epochs} fine-tuning "
               f"epoch(s) on {args.downstream_images or 'all'} images; encoder {args.model} pretrained for "
               f"{args.pretrain_epochs} epoch(s) on {args.pretrain_images or 'all'} images ({args.target} target, "
               f"blr {args.blr:g}, mask ratio {args.mask_ratio:g}); kNN accuracy after each pretraining epoch: "
               f"{', '.join(f'{a:.2f}' for a in knn)} %; {sum(seconds.values()) / 60:.1f} min on {args.device}, "
               f"precision {args.amp}{', compiled pretraining' if args.compile else ''}")
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n\n" + summary + "\n")
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump({"accuracy": accuracy, "knn_acc1": knn, "seconds": seconds, "args": vars(args)}, f, indent=1)
    print("\n" + table + "\n\n" + summary)
    print(f"figures: {os.path.join(args.output_dir, 'pretrain', 'vis')}, "
          f"loss curve: {os.path.join(args.output_dir, 'pretrain', 'loss_curve.png')}")


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
