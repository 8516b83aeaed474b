"""Learning-rate schedule of the original recipe: per-iteration linear warmup, then half-cycle cosine."""
import math


def lr_at(epoch: float, args) -> float:
    """The learning rate at a fractional epoch (``step / steps_per_epoch + epoch``)."""
    if epoch < args.warmup_epochs:
        return args.lr * epoch / args.warmup_epochs
    progress = (epoch - args.warmup_epochs) / max(args.epochs - args.warmup_epochs, 1e-8)
    return args.min_lr + (args.lr - args.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def adjust_learning_rate(optimizer, epoch: float, args) -> float:
    """Set every group's lr (times its ``lr_scale``, e.g. from layer-wise decay); return the base lr."""
    lr = lr_at(epoch, args)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def set_effective_lr(args, world_size: int) -> float:
    """Set ``args.lr``: ``--lr`` if given, else blr x effective batch / 256 (effective batch = batch x accum x
    world size), as the original recipe; print both."""
    eff_batch = args.batch_size * args.accum_iter * world_size
    if args.lr is None:
        args.lr = args.blr * eff_batch / 256
    print(f"base lr: {args.lr * 256 / eff_batch:.2e}  actual lr: {args.lr:.2e}  effective batch size: {eff_batch}")
    return args.lr
