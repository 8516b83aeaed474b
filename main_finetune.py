"""Fine-tuning a pretrained MAE encoder as a classifier (end to end, or only its last blocks).

    python main_finetune.py --model vit_base_patch16 --finetune mae_pretrain_vit_base.pth --data_path DIR \
        --batch_size 32 --accum_iter 4 --blr 5e-4 --layer_decay 0.65 --weight_decay 0.05 --drop_path 0.1 \
        --reprob 0.25 --mixup 0.8 --cutmix 1.0 --epochs 100 --dist_eval
    python main_finetune.py --eval --resume mae_finetuned_vit_base.pth --model vit_base_patch16 --data_path DIR
"""
from __future__ import annotations

import datetime
import time

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy

from engine import evaluate, train_one_epoch
from util import distributed
from util.amp import GradientUpdater
from util.checkpoint import load_pretrained, resume_training, save_training_state
from util.cli import Parser, add_classifier_args, add_common_args, count, evaluation_due, run
from util.datasets import dataset_info
from util.errors import UserError
from util.loader import build_classification_loaders
from util.logger import tensorboard_writer, write_log_line
from util.lr_decay import param_groups_layer_decay
from util.lr_sched import set_effective_lr
from util.runtime import adamw, build_model, count_parameters, finish_run, setup_run, wrap_model


def get_args_parser():
    parser = Parser("MAE fine-tuning for image classification", add_help=True)
    add_common_args(parser)
    add_classifier_args(parser, global_pool_default=True)
    g = parser.add_argument_group("fine-tuning")
    g.add_argument("--drop_path", type=float, default=0.1, metavar="PCT", help="drop path rate")
    g.add_argument("--layer_decay", type=float, default=0.75, help="layer-wise lr decay from ELECTRA/BEiT")
    g.add_argument("--trainable_blocks", type=count(0), default=None, metavar="K",
                   help="partial fine-tuning: train only the last K blocks, the final norm and the head")
    g = parser.add_argument_group("augmentation")
    g.add_argument("--crop_padding", type=count(0), default=None, metavar="PX",
                   help="images up to 64 px: random crops of the image padded by PX pixels (default: size / 8; "
                        "0: no crop, flips only)")
    g.add_argument("--color_jitter", type=float, metavar="PCT", help="color jitter factor (used only without --aa)")
    g.add_argument("--aa", default="rand-m9-mstd0.5-inc1", metavar="NAME",
                   help='AutoAugment policy, e.g. "rand-m9-mstd0.5-inc1"; "none" to disable')
    g.add_argument("--smoothing", type=float, default=0.1, help="label smoothing")
    g.add_argument("--reprob", type=float, default=0.25, metavar="PCT", help="random erase probability")
    g.add_argument("--remode", type=str, default="pixel", help="random erase mode")
    g.add_argument("--recount", type=count(1), default=1, help="random erase count")
    g.add_argument("--resplit", action="store_true", default=False, help="ignored; kept for the original command lines")
    g.add_argument("--mixup", type=float, default=0, help="mixup alpha, mixup enabled if > 0")
    g.add_argument("--cutmix", type=float, default=0, help="cutmix alpha, cutmix enabled if > 0")
    g.add_argument("--cutmix_minmax", type=float, nargs="+", help="cutmix min/max ratio (overrides alpha)")
    g.add_argument("--mixup_prob", type=float, default=1.0, help="probability of mixup or cutmix per batch")
    g.add_argument("--mixup_switch_prob", type=float, default=0.5, help="probability of cutmix instead of mixup")
    g.add_argument("--mixup_mode", type=str, default="batch", choices=("batch", "pair", "elem"))
    parser.set_defaults(model="vit_large_patch16", epochs=50, blr=1e-3, min_lr=1e-6, warmup_epochs=5, weight_decay=0.05)
    return parser


def freeze_all_but_last_blocks(model, k):
    """Only the last ``k`` blocks, the norms after them and the head learn; frozen blocks compute as in evaluation."""
    if not 0 <= k <= len(model.blocks):
        raise UserError(f"--trainable_blocks must be between 0 and {len(model.blocks)}, got {k}")
    frozen = model.blocks[:len(model.blocks) - k]
    for part in (model.cls_token, model.pos_embed, model.patch_embed, *frozen):
        part.requires_grad_(False)
    for block in frozen:
        block.drop_path1 = block.drop_path2 = torch.nn.Identity()


def main(args):
    if args.eval and not args.resume:
        raise UserError("--eval evaluates the checkpoint given with --resume")
    device = setup_run(args)

    # data
    data_loader_train, data_loader_val, args.nb_classes = build_classification_loaders(args, "finetune")
    mixup_fn = None
    if args.mixup > 0 or args.cutmix > 0 or args.cutmix_minmax is not None:
        if args.batch_size % 2:
            raise UserError(f"mixup/cutmix mixes pairs of images: --batch_size must be even, got {args.batch_size}")
        mixup_fn = Mixup(mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, cutmix_minmax=args.cutmix_minmax,
                         prob=args.mixup_prob, switch_prob=args.mixup_switch_prob, mode=args.mixup_mode,
                         label_smoothing=args.smoothing, num_classes=args.nb_classes)
        print("mixup/cutmix on")

    # model
    model = build_model(args.model, img_size=args.input_size, in_chans=dataset_info(args).in_chans,
                        num_classes=args.nb_classes, drop_path_rate=args.drop_path, global_pool=args.global_pool)
    if args.finetune and not args.eval:
        load_pretrained(model, args.finetune, head_init_std=2e-5)
    if args.trainable_blocks is not None:
        freeze_all_but_last_blocks(model, args.trainable_blocks)
    print(f"model {args.model}: {count_parameters(model) / 1e6:.2f}M trainable parameters")
    model_ddp = wrap_model(model, args, device)

    # optimizer: AdamW with layer-wise lr decay; no weight decay for 1-D params, position table and tokens
    set_effective_lr(args, distributed.get_world_size())
    param_groups = param_groups_layer_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay(),
                                            layer_decay=args.layer_decay)
    optimizer = adamw(param_groups, args.lr, device)
    updater = GradientUpdater(args.amp, device)
    if mixup_fn is not None:
        criterion = SoftTargetCrossEntropy()  # the smoothing is in the mixed targets
    elif args.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=args.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    start = resume_training(args, model, optimizer, updater)

    if args.eval:
        evaluate(data_loader_val, model_ddp, device, args)
        return

    log_writer = tensorboard_writer(args.log_dir)
    print(f"start training for {args.epochs} epochs ({args.amp} precision)")
    start_time = time.time()
    step, max_accuracy = start.step, start.max_accuracy
    for epoch in range(start.epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch, start_index=step * args.batch_size)
        train_stats = train_one_epoch(model_ddp, data_loader_train, optimizer, device, epoch, updater, args,
                                      log_writer=log_writer, criterion=criterion, mixup_fn=mixup_fn,
                                      start_step=step, max_accuracy=max_accuracy)
        step = 0
        test_stats = {}
        if evaluation_due(epoch, args):
            test_stats = evaluate(data_loader_val, model_ddp, device, args)
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"accuracy of the network on {len(data_loader_val.dataset)} test images: {test_stats['acc1']:.2f}%, "
                  f"max {max_accuracy:.2f}%")
        write_log_line(args.output_dir, epoch, train_stats, test_stats, log_writer, max_accuracy=max_accuracy)
        save_training_state(args, epoch, model, optimizer, updater, max_accuracy=max_accuracy,
                            keep=epoch % args.save_freq == 0 or epoch + 1 == args.epochs)
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    finish_run()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
