"""One training epoch and one evaluation pass, shared by pretraining, fine-tuning and linear probing: the lr per
iteration, mixed precision, gradient accumulation (DDP ``no_sync`` on the intermediate micro-steps), clipping, and
logging that reads values back to the host only when it prints."""
from __future__ import annotations

import contextlib

import torch

from util import distributed, lr_sched
from util.amp import autocast
from util.checkpoint import save_training_state
from util.errors import UserError
from util.logger import MetricLogger


def train_one_epoch(model, data_loader, optimizer, device, epoch, updater, args, log_writer=None, criterion=None,
                    mixup_fn=None, start_step=0, max_accuracy=0.0):
    """Train ``model`` (possibly DDP-wrapped) for one epoch; return the epoch's mean of each logged value over all
    processes. A non-finite loss stops the run with a ``UserError`` naming the epoch and step. ``start_step`` > 0
    continues an epoch whose first steps a mid-epoch checkpoint holds (the sampler skips them); with
    ``--save_every_iters N`` such a checkpoint is written every N iterations (``max_accuracy`` goes into it)."""
    model.train(True)
    accum_iter = args.accum_iter
    steps = start_step + len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    metric_logger = MetricLogger()
    first_bad_step = torch.tensor(-1, device=device)  # set on the device: no sync per step
    images_per_step = args.batch_size * distributed.get_world_size()

    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]",
                                                             start=start_step, total=steps):
        if step % accum_iter == 0:
            lr = lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        # as the original: an epoch's leftover micro-batches (len % accum_iter) never make an update
        update = (step + 1) % accum_iter == 0
        # intermediate micro-steps accumulate locally; the all-reduce happens once, on the update step
        with contextlib.nullcontext() if update else no_sync():
            with autocast(args.amp, device):
                if criterion is None:  # a masked autoencoder computes its own loss
                    loss, _, _ = model(samples, mask_ratio=args.mask_ratio)
                else:
                    if mixup_fn is not None:
                        samples, targets = mixup_fn(samples, targets)
                    loss = criterion(model(samples), targets)
            grad_norm = updater(loss / accum_iter, optimizer, params, clip_grad=args.clip_grad, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        loss = loss.detach().float()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        metric_logger.update(loss=loss, lr=lr, grad_norm=grad_norm)
        if update and args.save_every_iters and (step + 1) % args.save_every_iters == 0 and step + 1 < steps:
            stop_if_not_finite(first_bad_step, epoch, args)  # never checkpoint diverged weights
            save_training_state(args, epoch, unwrap(model), optimizer, updater, max_accuracy=max_accuracy,
                                next_step=step + 1)

        if step % args.print_freq == 0 or step + 1 == steps:
            stop_if_not_finite(first_bad_step, epoch, args)
            if log_writer is not None:
                x = int((step / steps + epoch) * 1000)  # the original's x axis: epoch x 1000
                log_writer.add_scalar("train_loss", metric_logger.loss.median, x)
                log_writer.add_scalar("lr", lr, x)
                if "grad_norm" in metric_logger.meters:
                    log_writer.add_scalar("grad_norm", metric_logger.grad_norm.median, x)
                if metric_logger.iter_time.count:
                    log_writer.add_scalar("images_per_s", images_per_step / metric_logger.iter_time.median, x)

    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return metric_logger.averages()


def stop_if_not_finite(first_bad_step: torch.Tensor, epoch: int, args) -> None:
    bad = first_bad_step.clone()
    if distributed.is_dist():  # every rank stops together
        bad = bad.to(distributed.collective_device())
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    step = int(bad.item())
    if step >= 0:
        where = f"{args.output_dir}/checkpoint-last.pth" if args.output_dir else "none (no --output_dir)"
        raise UserError(f"loss is not finite at epoch {epoch}, step {step}; stopping. "
                        f"The last good checkpoint is kept: {where}")


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while isinstance(model, torch.nn.parallel.DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model._orig_mod
    return model


@torch.no_grad()
def evaluate(data_loader, model, device, args):
    """Top-1 / top-5 accuracy and cross-entropy over ``data_loader`` (summed over ranks when it is sharded)."""
    criterion = torch.nn.CrossEntropyLoss(reduction="sum")
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, top1, top5, count
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        with autocast(args.amp, device):
            output = model(samples)
        output = output.float()
        top = output.topk(min(5, output.shape[1]), dim=1).indices
        correct = top.eq(targets.unsqueeze(1))
        totals += torch.stack([criterion(output, targets).double(), correct[:, :1].sum().double(),
                               correct.sum().double(), torch.tensor(len(targets), dtype=torch.float64, device=device)])
    if isinstance(data_loader.sampler, torch.utils.data.DistributedSampler) and distributed.is_dist():
        totals = totals.to(distributed.collective_device())
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(count)} images)")
    return stats
