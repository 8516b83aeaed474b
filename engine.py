"""One training epoch and one evaluation pass, shared by pretraining, fine-tuning and linear probing.

The programs differ only in how a batch becomes a loss (``loss_fn``); everything around it lives here once:
the per-iteration learning rate, mixed precision, gradient accumulation without all-reduce on the
intermediate micro-steps (DDP ``no_sync``), gradient clipping, and logging that reads values back to the
host only when it prints.
"""
from __future__ import annotations

import contextlib

import torch

from util import distributed, lr_sched
from util.amp import autocast
from util.cli import NonFiniteLossError
from util.logger import MetricLogger


def train_one_epoch(model, loss_fn, data_loader, optimizer, device, epoch, updater, args,
                    log_writer=None, clip_grad=None, frozen_modules=()):
    """Train ``model`` for one epoch; return the epoch's mean of each logged value over all processes.

    ``loss_fn(model, samples, targets) -> loss`` runs under autocast. ``frozen_modules`` stay in eval mode
    (a linear probe's encoder). A non-finite loss raises ``NonFiniteLossError`` naming the epoch and step.
    """
    model.train(True)
    for module in frozen_modules:
        module.eval()
    accum_iter = args.accum_iter
    steps = len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    no_sync = getattr(model, "no_sync", None)
    metric_logger = MetricLogger()
    first_bad_step = torch.tensor(-1, device=device)  # set on the device: no sync per step
    images_per_step = args.batch_size * distributed.get_world_size()

    optimizer.zero_grad(set_to_none=True)
    for step, (samples, targets) in metric_logger.log_every(data_loader, args.print_freq, f"Epoch: [{epoch}]"):
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
        bad = bad.to(distributed._collective_device())
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    step = int(bad.item())
    if step >= 0:
        where = f"{args.output_dir}/checkpoint-last.pth" if args.output_dir else "none (no --output_dir)"
        raise NonFiniteLossError(
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
        totals = totals.to(distributed._collective_device())
        torch.distributed.all_reduce(totals)
    loss, top1, top5, count = totals.tolist()
    stats = {"loss": loss / count, "acc1": 100 * top1 / count, "acc5": 100 * top5 / count}
    print(f"* Acc@1 {stats['acc1']:.3f} Acc@5 {stats['acc5']:.3f} loss {stats['loss']:.3f} ({int(count)} images)")
    return stats
