"""MAE pretraining.

    python main_pretrain.py --model mae_vit_base_patch16 --norm_pix_loss --data_path /path/to/imagenet
    python main_pretrain.py --target hog ...                                        (MaskFeat)
    python main_pretrain.py --target teacher --teacher_model vit_base_patch16_clip_224 \
        --teacher_checkpoint clip_b16.pth --target_loss cosine ...                  (MILAN; smooth_l1: MaskDistill)
    python main_pretrain.py --target teacher --teacher_checkpoint output_dir/checkpoint-last.pth ...
                                                    (the encoder of one of this package's pretraining runs)
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
from util.cli import Parser, add_common_args, run
from util.errors import UserError
from util.datasets import build_dataset, build_transform, dataset_info
from util.loader import build_loader
from util.logger import tensorboard_writer
from util.lr_sched import set_effective_lr
from util.visualize import build_reconstruction_logger, plot_loss_curve
from util.runtime import adamw_implementation, build_model, count_parameters, setup_run, wrap_model
from util.targets import TARGETS, TEACHER_LOSSES, build_model_and_target, resolve_target_args


def get_args_parser():
    parser = Parser("MAE pretraining", add_help=True)
    add_common_args(parser)
    g = parser.add_argument_group("masked autoencoder")
    g.add_argument("--mask_ratio", default=0.75, type=float, help="fraction of patches removed, in [0, 1)")
    g.add_argument("--norm_pix_loss", action="store_true",
                   help="regress each patch's pixels normalised by its own mean and std (the released models')")
    g = parser.add_argument_group("reconstruction target (util/targets.py)")
    g.add_argument("--target", default=None, choices=TARGETS,
                   help="what the decoder predicts for the removed patches (default pixel; --norm_pix_loss is "
                        "norm_pixel): pixels, per-patch normalised pixels, HOG histograms (MaskFeat) or a frozen "
                        "teacher's features (MaskDistill, MILAN)")
    g.add_argument("--hog_cell", default=None, type=int, metavar="PX",
                   help="hog: cell size in px, dividing the patch (default half the patch: 8 for 16-px patches)")
    g.add_argument("--teacher_model", default=None, metavar="NAME",
                   help="teacher: a timm model name (default: the model named in --teacher_checkpoint's training "
                        "arguments; a mae_vit_* pretraining checkpoint gives its encoder)")
    g.add_argument("--teacher_checkpoint", default=None, metavar="FILE",
                   help="teacher: local weights (timm or this package's checkpoint), read with weights_only")
    g.add_argument("--teacher_pretrained", action="store_true",
                   help="teacher: download timm's hub weights for --teacher_model instead (needs internet)")
    g.add_argument("--teacher_layer", default=-1, type=int, metavar="K",
                   help="teacher: the block whose output is the target (negative counts from the end; default last)")
    g.add_argument("--teacher_input_size", default=None, type=int, metavar="PX",
                   help="teacher: resize the images to this size for the teacher (default: --input_size); its "
                        "features are resampled to the student's patch grid either way")
    g.add_argument("--target_loss", default=None, choices=TEACHER_LOSSES,
                   help="teacher: smooth_l1 (MaskDistill, the default) or cosine, i.e. 2 - 2 cos (MILAN)")
    g = parser.add_argument_group("reconstruction figures")
    g.add_argument("--vis_freq", default=20, type=int,
                   help="reconstruction figure of fixed held-out images every N epochs and at the end (0: never)")
    g.add_argument("--vis_images", default=8, type=int, help="held-out images in the reconstruction figure")
    parser.set_defaults(model="mae_vit_large_patch16", epochs=400, blr=1e-3, warmup_epochs=40,
                        weight_decay=0.05, min_lr=0.0)
    return parser


def pretrain_loss(mask_ratio, target=None):
    """The loss of a batch; ``target`` (util/targets.py) computes non-pixel targets outside the model, under the
    same autocast (the engine's), so a teacher is never part of the trained, wrapped or saved module."""
    def loss_fn(model, samples, _targets):
        if target is None:
            loss, _pred, _mask = model(samples, mask_ratio=mask_ratio)
        else:
            loss, _pred, _mask = model(samples, mask_ratio=mask_ratio, target=target(samples))
        return loss
    return loss_fn


def main(args):
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    resolve_target_args(args)
    device = setup_run(args)

    # data
    info = dataset_info(args)
    dataset_train = build_dataset("train", args, build_transform("pretrain", args))
    print(f"training images: {len(dataset_train)}")
    data_loader_train = build_loader(dataset_train, args, train=True)

    # model and optimizer; a non-pixel target's generator runs outside the model (util/targets.py)
    model, target = build_model_and_target(args.model, vars(args), info.mean, info.std, device,
                                           img_size=args.input_size, in_chans=info.in_chans,
                                           norm_pix_loss=args.norm_pix_loss)
    if target is not None:
        print(f"target: {target.describe()}")
    print(f"model {args.model}: {count_parameters(model) / 1e6:.1f}M trainable parameters")
    model_ddp = wrap_model(model, args, device)

    set_effective_lr(args, distributed.get_world_size())
    # no weight decay on norms, biases, position tables and tokens
    param_groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95), **adamw_implementation(device))
    updater = GradientUpdater(args.amp, device)
    resumed = resume_training(args, model, optimizer, updater)
    saved = (resumed or {}).get("args")
    saved_target = saved.get("target") if isinstance(saved, dict) else None  # None: written before targets existed
    if saved_target and saved_target != args.target:
        raise UserError(f"the checkpoint to resume was pretrained with --target {saved_target}, this run asks for "
                         f"--target {args.target}; keep the target or start in a new --output_dir")

    log_writer = tensorboard_writer(args.log_dir)
    reconstructions = (build_reconstruction_logger(args, num_images=args.vis_images, target=target)
                       if args.vis_freq else None)

    def on_epoch_end(epoch):
        last = epoch + 1 == args.epochs
        if reconstructions is not None and (epoch % args.vis_freq == 0 or last):
            reconstructions(model, epoch, args.output_dir, log_writer)  # the unwrapped model
        if last and args.output_dir and distributed.is_main_process():
            plot_loss_curve(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "loss_curve.png"))

    # the loop
    fit(args, model, model_ddp, pretrain_loss(args.mask_ratio, target), data_loader_train, optimizer, updater, device,
        log_writer=log_writer, on_epoch_end=on_epoch_end)
    distributed.destroy()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
