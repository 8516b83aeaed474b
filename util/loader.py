"""DataLoaders over a DistributedSampler: the same code path for one process and many."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from util import distributed


def build_loader(dataset, args, train: bool, shard_eval: bool = False) -> DataLoader:
    """Training: shuffled per epoch (``sampler.set_epoch``) from ``args.seed``, incomplete last batch dropped.
    Evaluation: in order; with ``shard_eval`` each rank sees a 1/world share (padded to equal length by the
    sampler, as the original's --dist_eval), else every rank sees everything."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    if train or shard_eval:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=train, seed=args.seed)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    if train and len(dataset) < args.batch_size * world:
        from util.cli import UsageError

        raise UsageError(
            f"the training set has {len(dataset)} images, fewer than one batch "
            f"({args.batch_size} x {world} processes); lower --batch_size"
        )
    return DataLoader(
        dataset,
        sampler=sampler,
        batch_size=args.batch_size,
        num_workers=args.num_workers,
        pin_memory=args.pin_mem and torch.cuda.is_available(),
        drop_last=train,
        persistent_workers=False,
    )
