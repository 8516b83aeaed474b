"""Flags shared by the programs, one-line errors, program entry. Flag names and defaults follow the original code,
so its command lines work unchanged; each program sets its own defaults where the original's differed."""
from __future__ import annotations

import argparse
import sys

import torch

from util.amp import AMP_CHOICES
from util.datasets import DATASETS
from util.errors import UserError, one_line


class Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line instead of the whole usage block."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(2)


def count(minimum: int):
    """An argparse type for a count: an integer of at least ``minimum``, else a one-line usage error."""
    def integer(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return integer


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def add_common_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("training")
    g.add_argument("--batch_size", default=64, type=count(1),
                   help="batch size per process; effective batch = batch_size x accum_iter x world size")
    g.add_argument("--epochs", default=400, type=count(1))
    g.add_argument("--accum_iter", default=1, type=count(1), metavar="N",
                   help="accumulate N iterations' gradients per step")
    g.add_argument("--model", type=str, help="name of the model to train")
    g.add_argument("--input_size", default=224, type=count(1), help="image size (divisible by the patch size)")

    g = parser.add_argument_group("optimizer")
    g.add_argument("--weight_decay", type=float, default=0.05)
    g.add_argument("--lr", type=float, default=None, metavar="LR", help="absolute learning rate (overrides --blr)")
    g.add_argument("--blr", type=float, default=1e-3, metavar="LR", help="base lr: lr = blr x effective batch / 256")
    g.add_argument("--min_lr", type=float, default=0.0, metavar="LR", help="lower bound of the cosine schedule")
    g.add_argument("--warmup_epochs", type=count(0), default=40, metavar="N", help="epochs of linear warmup")
    g.add_argument("--clip_grad", type=float, default=None, metavar="NORM", help="clip gradient norm (default: none)")

    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="imagefolder", choices=DATASETS, help="imagefolder: DATA_PATH/{train,val}/"
                   "CLASS/*; cifar*: torchvision's files; filelist: --train_list/--val_list; fashion_mnist: idx files")
    g.add_argument("--data_path", default=None, type=str, help="dataset root")
    g.add_argument("--train_list", default=None, help="filelist: list of training images (default DATA_PATH/train.txt)")
    g.add_argument("--val_list", default=None, help="filelist: list of validation images (default DATA_PATH/val.txt)")
    g.add_argument("--download", action="store_true", help="download cifar10/100 or fashion_mnist when online")
    g.add_argument("--max_train_images", default=0, type=count(0), metavar="N",
                   help="first N training images only (0: all)")
    g.add_argument("--num_workers", default=10, type=count(0))
    g.add_argument("--pin_mem", action="store_true", default=True, help="pin CPU memory in the DataLoader (default)")
    g.add_argument("--no_pin_mem", action="store_false", dest="pin_mem")

    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default="./output_dir", help="where checkpoints and log.txt go ('' for none)")
    g.add_argument("--log_dir", default="./output_dir", help="where TensorBoard logs go ('' for none)")
    g.add_argument("--resume", default="", help="resume from this checkpoint (weights as --finetune takes them: the "
                   "model only)")
    g.add_argument("--auto_resume", action="store_true",
                   help="resume from the newest checkpoint in OUTPUT_DIR that loads, if any (always on under SLURM and "
                        "after torchrun restarts)")
    g.add_argument("--overwrite", action="store_true",
                   help="start afresh in an --output_dir that holds an earlier run (deletes its checkpoints and logs)")
    g.add_argument("--start_epoch", default=0, type=count(0), metavar="N", help="first epoch (set by --resume)")
    g.add_argument("--save_freq", default=20, type=count(1), metavar="N",
                   help="keep checkpoint-EPOCH.pth every N epochs (checkpoint-last.pth is written every epoch)")
    g.add_argument("--save_every_iters", default=0, type=count(0), metavar="N", help="also write checkpoint-last.pth "
                   "every N iterations, so a preempted job loses at most N (0: only at epoch ends)")
    g.add_argument("--print_freq", default=20, type=count(1), metavar="N", help="progress line every N iterations")

    g = parser.add_argument_group("device, precision, distributed")
    g.add_argument("--device", default=default_device(), help="cuda or cpu (default: cuda when available)")
    g.add_argument("--seed", default=0, type=int)
    g.add_argument("--amp", choices=AMP_CHOICES,
                   help="mixed precision (default: bf16 on GPUs that support it and on CPUs with AMX or AVX512-BF16, "
                        "else none)")
    g.add_argument("--compile", action="store_true", help="wrap the model in torch.compile")
    g.add_argument("--grad_ckpt", action="store_true", help="activation checkpointing: recompute the blocks' "
                   "activations in the backward pass instead of storing them (less memory, ~1/3 more compute)")
    g.add_argument("--fsdp", action="store_true", help="shard parameters, gradients and optimizer state over the "
                   "processes (FSDP2; checkpoints: checkpoint-*.dcp directories) instead of replicating them (DDP)")
    g.add_argument("--world_size", default=1, type=int, help="set from the environment (torchrun, SLURM)")
    g.add_argument("--local_rank", default=-1, type=int, help="ignored; torchrun's LOCAL_RANK is read instead")
    g.add_argument("--dist_on_itp", action="store_true", help="ignored; kept for the original command lines")
    g.add_argument("--dist_url", default="env://", help="url used to set up distributed training")


def run(main, args) -> None:
    """Call ``main(args)``; a user error becomes one line on stderr and exit status 1."""
    try:
        main(args)
    except UserError as e:
        sys.stderr.write(f"error: {one_line(e)}\n")
        sys.exit(1)


def add_classifier_args(parser: argparse.ArgumentParser, global_pool_default: bool) -> None:
    """Flags shared by fine-tuning and linear probing."""
    g = parser.add_argument_group("classifier")
    g.add_argument("--finetune", default="", help="start from these pretrained weights: ours or the released files, "
                   "a .safetensors file, a timm or Hugging Face ViTMAE directory, hf-hub:ORG/NAME")
    g.add_argument("--global_pool", action="store_true", help="classify the mean of the patch tokens (after fc_norm)")
    g.add_argument("--cls_token", action="store_false", dest="global_pool", help="classify the class token")
    parser.set_defaults(global_pool=global_pool_default)
    g.add_argument("--nb_classes", default=None, type=count(1), help="number of classes (default: the data set's)")
    g.add_argument("--eval", action="store_true", help="only evaluate the --resume checkpoint")
    g.add_argument("--dist_eval", action="store_true", help="shard evaluation over processes (faster; pads the set)")
    g.add_argument("--eval_freq", default=1, type=count(1), metavar="N",
                   help="evaluate after every N-th epoch and after the last (default 1: every epoch, as the original)")


def evaluation_due(epoch: int, args) -> bool:
    """Whether a classifier program evaluates after ``epoch`` (0-based): every ``--eval_freq``-th epoch and the last."""
    return (epoch + 1) % args.eval_freq == 0 or epoch + 1 == args.epochs
