"""One training epoch and one evaluation pass, shared by pretraining, fine-tuning and linear probing.

The programs differ only in how a batch becomes a loss (``loss_fn``); everything around it lives here once:
the per-iteration learning rate, mixed precision, gradient accumulation without all-reduce on the
intermediate micro-steps (DDP ``no_sync``), gradient clipping, and logging that reads values back to the
host only when it prints.
"""
from __future__ import annotations

import contextlib
import datetime
import time

import torch

from util import distributed, lr_sched
from util.amp import autocast
from util.errors import UserError
from util.logger import MetricLogger


def train_one_epoch(model, loss_fn, data_loader, optimizer, device, epoch, updater, args,
                    log_writer=None, clip_grad=None, frozen_modules=(), start_step=0, on_update=None):
    """Train ``model`` for one epoch; return the epoch's mean of each logged value over all processes.

    ``loss_fn(model, samples, targets) -> loss`` runs under autocast. ``frozen_modules`` stay in eval mode
    (a linear probe's encoder). A non-finite loss raises ``UserError`` naming the epoch and step.
    ``start_step`` > 0 continues an epoch whose first steps a mid-epoch checkpoint already holds (the loader's
    sampler skips them); ``on_update(step)`` runs after each optimizer step.
    """
    model.train(True)
    for module in frozen_modules:
        module.eval()
    accum_iter = args.accum_iter
    steps = start_step + len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    no_sync = getattr(model, "no_sync", None)
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
        update = (step + 1) % accum_iter == 0 or step + 1 == steps
        # intermediate micro-steps accumulate locally; the all-reduce happens once, on the update step
        sync_context = no_sync() if (no_sync is not None and not update) else contextlib.nullcontext()
        with sync_context:
            with autocast(args.amp, device):
                loss = loss_fn(model, samples, targets)
            grad_norm = updater(loss / accum_iter, optimizer, params, clip_grad=clip_grad, update_grad=update)
        if update:
            optimizer.zero_grad(set_to_none=True)

        loss = loss.detach().float()
        first_bad_step = torch.where((first_bad_step < 0) & ~torch.isfinite(loss), step, first_bad_step)
        metric_logger.update(loss=loss, lr=lr, grad_norm=grad_norm)
        if update and on_update is not None and step + 1 < steps:
            on_update(step, lambda: _stop_if_not_finite(first_bad_step, epoch, args))

        if step % args.print_freq == 0 or step + 1 == steps:
            _stop_if_not_finite(first_bad_step, epoch, args)
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


def _stop_if_not_finite(first_bad_step: torch.Tensor, epoch: int, args) -> None:
    bad = first_bad_step.clone()
    if distributed.is_dist():  # every rank stops together
        bad = bad.to(distributed.collective_device())
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    step = int(bad.item())
    if step >= 0:
        where = f"{args.output_dir}/checkpoint-last.pth" if args.output_dir else "none (no --output_dir)"
        raise UserError(
            f"loss is not finite at epoch {epoch}, step {step}; stopping. The last good checkpoint is kept: {where}"
        )


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
        k = min(5, output.shape[1])
        top = output.topk(k, dim=1).indices
        correct = top.eq(targets.unsqueeze(1))
        totals += torch.stack([criterion(output, targets).double(), correct[:, :1].sum().double(),
                               correct[:, :k].sum().double(), torch.tensor(len(targets), dtype=torch.float64, device=device)])
    if isinstance(data_loader.sampler, torch.utils.data.DistributedSampler) and distributed.is_dist():
        totals = totals.to(distributed.collective_device())
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(count)} images)")
    return stats


def fit(args, model, model_ddp, loss_fn, data_loader_train, optimizer, updater, device, *, data_loader_val=None,
        clip_grad=None, frozen_modules=(), log_writer=None, max_accuracy=0.0, on_epoch_end=None):
    """The epoch loop of every program: train, evaluate (classifiers), checkpoint, log.

    ``model`` is the unwrapped module (saved), ``model_ddp`` the one called (DDP / compiled). The checkpoint is
    written only after an epoch finished with finite losses, so a failing run keeps the last good one.
    ``on_epoch_end(epoch)`` runs after the checkpoint (pretraining's reconstruction figures). With
    ``--save_every_iters N`` a checkpoint is also written every N iterations, marked with the next step.
    """
    from util.checkpoint import save_training_state
    from util.logger import write_log_line

    print(f"start training for {args.epochs} epochs ({args.amp} precision)")
    start_time = time.time()
    start_step = getattr(args, "start_step", 0)  # > 0 after a mid-epoch checkpoint
    for epoch in range(args.start_epoch, args.epochs):
        data_loader_train.sampler.set_epoch(epoch, start_index=start_step * args.batch_size)

        def save_mid_epoch(step, check_finite, epoch=epoch):
            if args.save_every_iters and (step + 1) % args.save_every_iters == 0:
                check_finite()  # never checkpoint diverged weights
                save_training_state(args, epoch, model, optimizer, updater,
                                    extra={"max_accuracy": max_accuracy, "next_step": step + 1})

        train_stats = train_one_epoch(model_ddp, loss_fn, data_loader_train, optimizer, device, epoch, updater, args,
                                      log_writer=log_writer, clip_grad=clip_grad, frozen_modules=frozen_modules,
                                      start_step=start_step, on_update=save_mid_epoch)
        start_step = 0
        log_stats = {**{f"train_{k}": v for k, v in train_stats.items()}, "epoch": epoch}
        if data_loader_val is not None:
            test_stats = evaluate(data_loader_val, model_ddp, device, args)
            max_accuracy = max(max_accuracy, test_stats["acc1"])
            print(f"accuracy of the network on {len(data_loader_val.dataset)} test images: "
                  f"{test_stats['acc1']:.2f}% (max {max_accuracy:.2f}%)")
            log_stats.update({f"test_{k}": v for k, v in test_stats.items()}, max_accuracy=max_accuracy)
            if log_writer is not None:
                for key in ("acc1", "acc5", "loss"):
                    log_writer.add_scalar(f"perf/test_{key}", test_stats[key], epoch)
        last = epoch + 1 == args.epochs
        save_training_state(args, epoch, model, optimizer, updater, keep=epoch % args.save_freq == 0 or last,
                            extra={"max_accuracy": max_accuracy})
        write_log_line(args.output_dir, log_stats)
        if log_writer is not None:
            log_writer.flush()
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    print(f"training time {datetime.timedelta(seconds=int(time.time() - start_time))}")
    if log_writer is not None:
        log_writer.close()
    return max_accuracy
