"""Linear probing: a linear classifier on the frozen features of a pretrained MAE encoder.

    python main_linprobe.py --model vit_base_patch16 --cls_token --finetune mae_pretrain_vit_base.pth \
        --data_path DIR --batch_size 512 --accum_iter 4 --blr 0.1 --weight_decay 0.0 --epochs 90 --dist_eval

The head is BatchNorm1d (no affine, eps 1e-6) + Linear, trained with LARS; the encoder is frozen (it has no dropout,
so training mode changes nothing in it). ``--cache_features`` encodes the un-augmented images once and trains the same
head with the same optimizer and schedule on the cached features (benchmarks/bench_linprobe.py measures it)."""
from __future__ import annotations

import argparse
import datetime
import time

import torch
from timm.optim import Lars

from engine import evaluate, train_one_epoch
from util import distributed
from util.amp import GradientUpdater, autocast
from util.checkpoint import load_pretrained, resume_training, save_training_state
from util.cli import Parser, add_classifier_args, add_common_args, evaluation_due, run
from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError
from util.loader import build_classification_loaders, build_loader, limit_train_images
from util.logger import tensorboard_writer, write_log_line
from util.lr_sched import set_effective_lr
from util.runtime import build_model, count_parameters, finish_run, setup_run, wrap_model


def get_args_parser():
    parser = Parser("MAE linear probing for image classification", add_help=True)
    add_common_args(parser)
    add_classifier_args(parser, global_pool_default=False)
    parser.set_defaults(model="vit_large_patch16", batch_size=512, epochs=90, blr=0.1, weight_decay=0.0, min_lr=0.0,
                        warmup_epochs=10)
    parser.add_argument("--cache_features", action="store_true", help="encode the un-augmented train and val images "
                        "once and train the head on the cached features (much faster epochs; no training augmentation)")
    parser.add_argument("--no_train_augmentation", action="store_true", help="train the head on the evaluation "
                        "transform (no random crop or flip), which --cache_features encodes: the probe it reproduces")
    parser.epilog = ("The head is trained with timm's Lars (trust coefficient 0.001, momentum 0.9). With the default "
                     "--weight_decay 0 it is the original's LARS; with weight decay it differs slightly: timm "
                     "divides by |g| + wd|w| where the original divided by |g + wd*w|.")
    return parser


@torch.no_grad()
def extract_features(model, dataset, args, device):
    """The head's input (pooled features) and label of every image of ``dataset``, in order, on every rank's CPU."""
    loader = build_loader(dataset, args, train=False, shard_eval=True)  # rank r: images r, r + world, ...
    model.eval()
    features, labels = [], []
    for samples, targets in loader:
        with autocast(args.amp, device):
            tokens = model.forward_features(samples.to(device, non_blocking=True))
            features.append(model.forward_head(tokens, pre_logits=True).float())
        labels.append(targets.to(device))
    features, labels = torch.cat(features), torch.cat(labels)
    world = distributed.get_world_size()
    if world > 1:
        gathered = []
        for local in (features, labels):
            local = local.to(distributed.collective_device())
            parts = [torch.empty_like(local) for _ in range(world)]
            torch.distributed.all_gather(parts, local)
            gathered.append(merge_shards(parts, len(dataset)))
        features, labels = gathered
    return features.cpu(), labels.cpu()


def merge_shards(parts, length: int) -> torch.Tensor:
    """Undo an unshuffled DistributedSampler (process r held items r, r + world, ... of the padded list)."""
    return torch.stack(parts, dim=1).flatten(0, 1)[:length]


def cached_feature_loaders(model, args, device):
    """Train and val loaders over the cached features of the un-augmented images (the evaluation transform)."""
    start = time.time()
    plain = build_transform("eval", args)
    train = limit_train_images(build_dataset("train", args, plain), args)
    caches = [torch.utils.data.TensorDataset(*extract_features(model, dataset, args, device))
              for dataset in (train, build_dataset("val", args, plain))]
    print(f"cached the features of {len(caches[0])} training and {len(caches[1])} validation images "
          f"({caches[0].tensors[0].shape[1]} per image) in {time.time() - start:.1f} s")
    in_memory = argparse.Namespace(**{**vars(args), "num_workers": 0, "pin_mem": False})  # no worker processes
    return (build_loader(caches[0], in_memory, train=True),
            build_loader(caches[1], in_memory, train=False, shard_eval=args.dist_eval))


def lars_param_groups(head, weight_decay):
    """The original's LARS rule: weights decayed and trust-ratio adapted (``always_adapt``), 1-D parameters neither."""
    params = [p for p in head.parameters() if p.requires_grad]
    return [dict(params=[p for p in params if p.ndim > 1], weight_decay=weight_decay, always_adapt=True),
            dict(params=[p for p in params if p.ndim <= 1], weight_decay=0.0, always_adapt=False)]


def main(args):
    if args.eval and not args.resume:
        raise UserError("--eval evaluates the checkpoint given with --resume")
    device = setup_run(args)

    # data
    train_kind = "eval" if args.no_train_augmentation else "linprobe"
    data_loader_train, data_loader_val, args.nb_classes = build_classification_loaders(args, train_kind)

    # model: pretrained encoder, frozen; new head = BatchNorm (no affine) + Linear
    model = build_model(args.model, img_size=args.input_size, in_chans=dataset_info(args).in_chans,
                        num_classes=args.nb_classes, global_pool=args.global_pool)
    if args.finetune and not args.eval:
        load_pretrained(model, args.finetune, head_init_std=0.01)
    model.head = torch.nn.Sequential(torch.nn.BatchNorm1d(model.head.in_features, affine=False, eps=1e-6), model.head)
    # Only the head learns. With --global_pool, fc_norm keeps its initial affine (1, 0) as in the original: the
    # BatchNorm right after it cancels any per-feature scale and shift, so that affine would get zero gradient.
    model.requires_grad_(False)
    model.head.requires_grad_(True)
    print(f"model {args.model}: {count_parameters(model) / 1e6:.3f}M trainable parameters "
          f"(of {count_parameters(model, trainable_only=False) / 1e6:.1f}M)")
    cache = args.cache_features and not args.eval
    model_ddp = model.to(device) if cache else wrap_model(model, args, device)

    # optimizer: LARS on the head
    set_effective_lr(args, distributed.get_world_size())
    optimizer = Lars(lars_param_groups(model.head, args.weight_decay), lr=args.lr, momentum=0.9, trust_coeff=0.001,
                     eps=0.0)
    updater = GradientUpdater(args.amp, device)
    start = resume_training(args, model, optimizer, updater)

    if args.eval:
        evaluate(data_loader_val, model_ddp, device, args)
        return
    if cache:  # after resuming: the encoder that encodes is the one the checkpoint holds
        data_loader_train, data_loader_val = cached_feature_loaders(model, args, device)
        model_ddp = wrap_model(model.head, args, device)  # the only part that runs from now on

    log_writer = tensorboard_writer(args.log_dir)
    print(f"start training for {args.epochs} epochs ({args.amp} precision)")
    start_time = time.time()
    step, max_accuracy = start.step, start.max_accuracy
    for epoch in range(start.epoch, args.epochs):
        epoch_start = time.time()
        data_loader_train.sampler.set_epoch(epoch, start_index=step * args.batch_size)
        train_stats = train_one_epoch(model_ddp, data_loader_train, optimizer, device, epoch, updater, args,
                                      log_writer=log_writer, criterion=torch.nn.CrossEntropyLoss(), start_step=step,
                                      max_accuracy=max_accuracy)
        step = 0
        test_stats = {}
        if evaluation_due(epoch, args):
            test_stats = evaluate(data_loader_val, model_ddp, device, args)
            max_accuracy = max(max_accuracy, test_stats["acc1"])
        write_log_line(args.output_dir, epoch, train_stats, test_stats, log_writer, max_accuracy=max_accuracy)
        save_training_state(args, epoch, model, optimizer, updater, max_accuracy=max_accuracy,
                            keep=epoch % args.save_freq == 0 or epoch + 1 == args.epochs)
        print(f"epoch {epoch} took {time.time() - epoch_start:.2f} s (training, evaluation, checkpoint); "
              f"max accuracy {max_accuracy:.2f}%")
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    finish_run()


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
