"""One training epoch and one evaluation pass, shared by pretraining, fine-tuning and linear probing: the lr per
iteration, mixed precision, gradient accumulation (DDP ``no_sync`` on the intermediate micro-steps), clipping, and
logging that reads values back to the host only when it prints."""
from __future__ import annotations

import contextlib
import json
import time

import torch

from util import distributed, lr_sched
from util.amp import autocast
from util.checkpoint import save_training_state
from util.errors import UserError
from util.knn import K, TEMPERATURE, knn_accuracy
from util.logger import MetricLogger


def train_one_epoch(model, data_loader, optimizer, device, epoch, updater, args, log_writer=None, criterion=None,
                    mixup_fn=None, start_step=0, max_accuracy=0.0, step_log=None):
    """Train ``model`` (possibly DDP-wrapped) for one epoch; return the epoch's mean of each logged value over all
    processes. A non-finite loss stops the run with a ``UserError`` naming the epoch and step. ``start_step`` > 0
    continues an epoch whose first steps a mid-epoch checkpoint holds (the sampler skips them); with
    ``--save_every_iters N`` such a checkpoint is written every N iterations (``max_accuracy`` goes into it).
    ``step_log``: a file to append each iteration's loss to (``append_step_log``)."""
    model.train(True)
    accum_iter = args.accum_iter
    steps = start_step + len(data_loader)
    params = [p for p in model.parameters() if p.requires_grad]
    no_sync = getattr(model, "no_sync", contextlib.nullcontext)
    metric_logger = MetricLogger()
    first_bad_step = torch.tensor(-1, device=device)  # set on the device: no sync per step
    images_per_step = args.batch_size * distributed.get_world_size()
    step_losses = []  # this epoch's not yet written, on the device

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
        step_losses.append(loss)
        if update and args.save_every_iters and (step + 1) % args.save_every_iters == 0 and step + 1 < steps:
            stop_if_not_finite(first_bad_step, epoch, args)  # never checkpoint diverged weights
            save_training_state(args, epoch, unwrap(model), optimizer, updater, max_accuracy=max_accuracy,
                                next_step=step + 1)
            append_step_log(step_log, epoch, step + 1, steps, step_losses)  # a resume starts after these

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

    append_step_log(step_log, epoch, steps, steps, step_losses)
    metric_logger.synchronize_between_processes()
    print("Averaged stats:", metric_logger)
    return metric_logger.averages()


def append_step_log(path, epoch: int, next_step: int, steps: int, losses: list) -> None:
    """Append the losses of the steps before ``next_step`` (averaged over processes) to ``path`` as JSON lines
    ``{"epoch", "step", "steps", "loss"}`` (rank 0), and empty ``losses``. One read-back per call."""
    if not path or not losses:
        return
    values = distributed.all_reduce_sum_(torch.stack(losses).to(torch.float64)) / distributed.get_world_size()
    if distributed.is_main_process():
        first = next_step - len(losses)
        with open(path, mode="a", encoding="utf-8") as f:
            f.writelines(json.dumps({"epoch": epoch, "step": first + i, "steps": steps, "loss": loss}) + "\n"
                         for i, loss in enumerate(values.tolist()))
    losses.clear()


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


@torch.no_grad()
def embed(model, data_loader, device, args, pool: str = "mean"):
    """Features (the class token or the mean patch token of the unmasked MAE encoder) and labels of every image of a
    ``shard_eval`` loader's data set, in order, on every rank's CPU."""
    model.eval()
    in_order = torch.arange(model.patch_embed.num_patches, device=device, dtype=torch.float)  # as masking noise
    features, labels = [], []
    for samples, targets in data_loader:
        samples = samples.to(device, non_blocking=True)
        with autocast(args.amp, device):  # no patch removed, none reordered, no draw from the global RNG
            tokens, _, _ = model.forward_encoder(samples, 0.0, noise=in_order.expand(len(samples), -1))
        features.append((tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)).float())
        labels.append(targets.to(device))
    return [gather_shards(torch.cat(local), len(data_loader.dataset)) for local in (features, labels)]


def gather_shards(local: torch.Tensor, length: int) -> torch.Tensor:
    """The whole data set's rows from every rank's shard of an unshuffled DistributedSampler (rank r held items r,
    r + world, ... of the list padded to a multiple of world), on the CPU."""
    world = distributed.get_world_size()
    if world == 1:
        return local.cpu()
    local = local.to(distributed.collective_device())
    parts = [torch.empty_like(local) for _ in range(world)]
    torch.distributed.all_gather(parts, local)
    return torch.stack(parts, dim=1).flatten(0, 1)[:length].cpu()


def knn_evaluate(model, bank_loader, query_loader, device, args) -> dict:
    """Weighted kNN top-1 accuracy (util/knn.py) of the MAE encoder's ``args.knn_pool`` features: the validation
    images as queries, ``bank_loader``'s labelled training images as the memory bank. The same on every rank."""
    start = time.time()
    bank_features, bank_labels = embed(model, bank_loader, device, args, args.knn_pool)
    query_features, query_labels = embed(model, query_loader, device, args, args.knn_pool)
    if min(bank_labels.min(), query_labels.min()) < 0:
        raise UserError("--knn_freq needs labelled images, but some images of the data set have no label")
    accuracy = knn_accuracy(bank_features, bank_labels, query_features, query_labels)
    print(f"* kNN Acc@1 {accuracy:.2f} (k {K}, T {TEMPERATURE}, {args.knn_pool} token, {len(bank_labels)} memory-bank "
          f"and {len(query_labels)} query images) in {time.time() - start:.1f} s")
    return {"knn_acc1": accuracy}
