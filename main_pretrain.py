"""MAE pretraining: arguments, setup (distributed, data, model, optimizer, resume), then the epoch loop.

    python main_pretrain.py --model mae_vit_base_patch16 --norm_pix_loss --data_path /path/to/imagenet
    python main_pretrain.py --target hog ...          (MaskFeat; --target teacher --teacher_checkpoint F: MaskDistill)
    torchrun --nproc_per_node=8 main_pretrain.py ...  (one or several nodes; SLURM: submitit_pretrain.py)
"""
from __future__ import annotations

import datetime
import os
import time

from timm.optim import param_groups_weight_decay

from engine import knn_evaluate, train_one_epoch
from util import distributed
from util.amp import GradientUpdater
from util.checkpoint import resume_training, save_training_state
from util.cli import Parser, add_common_args, count, run
from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError
from util.figures import STEP_LOG, ReconstructionLogger, plot_loss_curve
from util.knn import build_knn_loaders
from util.loader import build_loader
from util.logger import tensorboard_writer, write_log_line
from util.lr_sched import set_effective_lr
from util.runtime import adamw, build_model, count_parameters, finish_run, setup_run, wrap_model
from util.targets import TARGETS, TEACHER_LOSSES, build_target, target_name


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
    g.add_argument("--hog_cell", default=None, type=count(1), metavar="PX",
                   help="hog: cell size in px, dividing the patch (default half the patch: 8 for 16-px patches)")
    g.add_argument("--teacher_model", default=None, metavar="NAME",
                   help="teacher: a timm model name (default: the model named in --teacher_checkpoint's training "
                        "arguments; a mae_vit_* pretraining checkpoint gives its encoder)")
    g.add_argument("--teacher_checkpoint", default=None, metavar="FILE",
                   help="teacher: weights as --finetune takes them (this package's, timm's, ViTMAE's; hf-hub:ORG/NAME)")
    g.add_argument("--teacher_pretrained", action="store_true",
                   help="teacher: download timm's hub weights for --teacher_model instead (needs internet)")
    g.add_argument("--teacher_layer", default=-1, type=int, metavar="K",
                   help="teacher: the block whose output is the target (negative counts from the end; default last)")
    g.add_argument("--teacher_input_size", default=None, type=count(1), metavar="PX",
                   help="teacher: resize the images to this size for the teacher (default: --input_size); its "
                        "features are resampled to the student's patch grid either way")
    g.add_argument("--target_loss", default=None, choices=TEACHER_LOSSES,
                   help="teacher: smooth_l1 (MaskDistill, the default) or cosine, i.e. 2 - 2 cos (MILAN)")
    g = parser.add_argument_group("reconstruction figures")
    g.add_argument("--vis_freq", default=20, type=count(0),
                   help="reconstruction figure of fixed held-out images every N epochs and at the end (0: never)")
    g.add_argument("--vis_images", default=8, type=count(1), help="held-out images in the reconstruction figure")
    g = parser.add_argument_group("kNN monitor (util/knn.py; needs labels)")
    g.add_argument("--knn_freq", default=0, type=count(0), help="weighted kNN accuracy (k 20, T 0.07) of the "
                   "unmasked encoder's features on the validation split every N epochs and at the end (0: never)")
    g.add_argument("--knn_pool", default="mean", choices=("cls", "mean"),
                   help="the feature: class token or mean of the patch tokens (default %(default)s)")
    g.add_argument("--knn_train_images", default=10000, type=count(0), metavar="N",
                   help="memory bank: N training images spread evenly over the split (0: all; default %(default)s)")
    parser.set_defaults(model="mae_vit_large_patch16", epochs=400, blr=1e-3, warmup_epochs=40,
                        weight_decay=0.05, min_lr=0.0)
    return parser


def main(args):
    if not 0.0 <= args.mask_ratio < 1.0:
        raise UserError(f"--mask_ratio must be in [0, 1), got {args.mask_ratio}")
    args.target = target_name(args)  # --norm_pix_loss is the original's spelling of --target norm_pixel
    args.norm_pix_loss = args.target == "norm_pixel"
    device = setup_run(args)

    # data
    info = dataset_info(args)
    dataset_train = build_dataset("train", args, build_transform("pretrain", args))
    print(f"training images: {len(dataset_train)}")
    data_loader_train = build_loader(dataset_train, args, train=True)
    knn_loaders = build_knn_loaders(args) if args.knn_freq else None  # memory bank and queries

    # model; a non-pixel target (util/targets.py) sets the decoder's output width and the loss
    model = build_model(args.model, img_size=args.input_size, in_chans=info.in_chans, norm_pix_loss=args.norm_pix_loss)
    target = build_target(vars(args), model, info.mean, info.std, device)
    if target is not None:
        model.set_target(target)
        print(f"target: {target.describe()}")
    print(f"model {args.model}: {count_parameters(model) / 1e6:.1f}M trainable parameters")
    model_ddp = wrap_model(model, args, device)

    # optimizer: AdamW, no weight decay on norms, biases, position tables and tokens
    set_effective_lr(args, distributed.get_world_size())
    param_groups = param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())
    optimizer = adamw(param_groups, args.lr, device, betas=(0.9, 0.95))
    updater = GradientUpdater(args.amp, device)
    start = resume_training(args, model, optimizer, updater)
    if start.args.get("target") not in (None, args.target):
        raise UserError(f"the checkpoint to resume was pretrained with --target {start.args['target']}, this run asks "
                        f"for --target {args.target}; keep the target or start in a new --output_dir")

    log_writer = tensorboard_writer(args.log_dir)
    reconstructions = ReconstructionLogger(args, args.vis_images) if args.vis_freq else None
    step_log = os.path.join(args.output_dir, STEP_LOG) if args.output_dir else None

    print(f"start training for {args.epochs} epochs ({args.amp} precision)")
    start_time = time.time()
    step = start.step  # > 0 only in the epoch a mid-epoch checkpoint stopped in
    for epoch in range(start.epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch, start_index=step * args.batch_size)
        train_stats = train_one_epoch(model_ddp, data_loader_train, optimizer, device, epoch, updater, args,
                                      log_writer=log_writer, start_step=step, step_log=step_log)
        step = 0
        last = epoch + 1 == args.epochs
        knn_stats = {}
        if knn_loaders is not None and (epoch % args.knn_freq == 0 or last):
            knn_stats = knn_evaluate(model, *knn_loaders, device, args)  # the unwrapped model
            if log_writer is not None:
                log_writer.add_scalar("perf/knn_acc1", knn_stats["knn_acc1"], epoch)
        # logged before saving: killed in between, the run resumes before this epoch and drops its line
        write_log_line(args.output_dir, epoch, train_stats, log_writer=log_writer, **knn_stats)
        save_training_state(args, epoch, model, optimizer, updater, keep=epoch % args.save_freq == 0 or last)
        if reconstructions is not None and (epoch % args.vis_freq == 0 or last):
            reconstructions.log(model, epoch, log_writer)  # the unwrapped model
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    if args.output_dir and distributed.is_main_process() and start.epoch < args.epochs:
        plot_loss_curve(os.path.join(args.output_dir, "log.txt"), os.path.join(args.output_dir, "loss_curve.png"))
    finish_run()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
