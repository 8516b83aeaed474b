"""MAE pretraining.

    python main_pretrain.py --model mae_vit_base_patch16 --norm_pix_loss --data_path /path/to/imagenet
    torchrun --nproc_per_node=8 main_pretrain.py ...        (one or several nodes)
    python submitit_pretrain.py --nodes 2 --ngpus 8 ...     (SLURM)

Reads top to bottom: arguments, setup (distributed, data, model, optimizer, resume), the epoch loop.
"""
from __future__ import annotations

import os

import torch
from timm.optim import param_groups_weight_decay

from engine import fit
from util import distributed
from util.amp import GradientUpdater
from util.checkpoint import resume_training
from util.cli import Parser, UsageError, add_common_args, run
from util.datasets import build_dataset, build_transform, dataset_info
from util.loader import build_loader
from util.logger import tensorboard_writer
from util.lr_sched import set_effective_lr
from util.visualize import build_reconstruction_logger, plot_loss_curve
from util.runtime import build_model, count_parameters, setup_run, wrap_model


def get_args_parser():
    parser = Parser("MAE pretraining", add_help=True)
    add_common_args(parser)
    g = parser.add_argument_group("masked autoencoder")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed, in [0, 1)")
    g.add_argument("--norm_pix_loss", action="store_true",
                   help="regress each patch's pixels normalised by its own mean and std (the released models')")
    g.add_argument("--vis_freq", default=20, type=int,
                   help="reconstruction figure of fixed held-out images every N epochs and at the end (0: never)")
    g.add_argument("--vis_images", default=8, type=int, help="held-out images in the reconstruction figure")
    parser.set_defaults(model="mae_vit_large_patch16", epochs=400, blr=1e-3, warmup_epochs=40,
                        weight_decay=0.05, min_lr=0.0)
    return parser


def pretrain_loss(mask_ratio):
    def loss_fn(model, samples, _targets):
        loss, _pred, _mask = model(samples, mask_ratio=mask_ratio)
        return loss
    return loss_fn


def main(args):
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UsageError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    device = setup_run(args)

    # data
    info = dataset_info(args)
    dataset_train = build_dataset("train", args, build_transform("pretrain", args))
    print(f"training images: {len(dataset_train)}")
    data_loader_train = build_loader(dataset_train, args, train=True)

    # model and optimizer
    model = build_model(args.model, img_size=args.input_size, in_chans=info.in_chans, norm_pix_loss=args.norm_pix_loss)
    print(f"model {args.model}: {count_parameters(model) / 1e6:.1f}M trainable parameters")
    model_ddp = wrap_model(model, args, device)

    set_effective_lr(args, distributed.get_world_size())
    # no weight decay on norms, biases, position tables and tokens
    param_groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    updater = GradientUpdater(args.amp, device)
    resume_training(args, model, optimizer, updater)

    log_writer = tensorboard_writer(args.log_dir)
    reconstructions = build_reconstruction_logger(args, num_images=args.vis_images) if args.vis_freq else None

    def on_epoch_end(epoch):
        last = epoch + 1 == args.epochs
        if reconstructions is not None and (epoch % args.vis_freq == 0 or last):
            reconstructions(model, epoch, args.output_dir, log_writer)  # the unwrapped model
        if last and args.output_dir and distributed.is_main_process():
            plot_loss_curve(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "loss_curve.png"))

    # the loop
    fit(args, model, model_ddp, pretrain_loss(args.mask_ratio), data_loader_train, optimizer, updater, device,
        log_writer=log_writer, on_epoch_end=on_epoch_end)
    distributed.destroy()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
