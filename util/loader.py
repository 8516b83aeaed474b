"""DataLoaders over a DistributedSampler: the same code path for one process and many."""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from util import distributed
from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError


class ResumableSampler(DistributedSampler):
    """A DistributedSampler that can resume a mid-epoch checkpoint: the epoch's order as ever (seed + epoch), less
    its first ``start_index`` samples. Its ``generator`` is the loader's, seeded per rank and epoch: the loader's
    draw of worker seeds stays off the global RNG, which checkpoints save and restore."""

    start_index = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.generator = torch.Generator()

    def set_epoch(self, epoch: int, start_index: int = 0) -> None:
        super().set_epoch(epoch)
        self.start_index = start_index
        self.generator.manual_seed(self.seed + 10007 * self.rank + epoch)

    def __iter__(self):
        return iter(list(super().__iter__())[self.start_index:])

    def __len__(self) -> int:
        return self.num_samples - self.start_index


def limit_train_images(dataset, args):
    """``--max_train_images N``: the first N images of the training split, for quick runs."""
    limit = getattr(args, "max_train_images", 0)
    return torch.utils.data.Subset(dataset, range(limit)) if limit and limit < len(dataset) else dataset


def build_loader(dataset, args, train: bool, shard_eval: bool = False) -> DataLoader:
    """Training: shuffled per epoch (``sampler.set_epoch``) from ``args.seed``, incomplete last batch dropped.
    Evaluation: in order; with ``shard_eval`` each rank sees a 1/world share (padded to equal length by the
    sampler, as the original's --dist_eval), else every rank sees everything."""
    world, rank = distributed.get_world_size(), distributed.get_rank()
    if train:
        dataset = limit_train_images(dataset, args)
        sampler = ResumableSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    elif shard_eval:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
    else:
        sampler = torch.utils.data.SequentialSampler(dataset)
    if train and len(dataset) < args.batch_size * world:
        raise UserError(f"the training set has {len(dataset)} images, fewer than one batch "
                        f"({args.batch_size} x {world} processes); lower --batch_size")
    generator = sampler.generator if train else torch.Generator().manual_seed(args.seed)
    return DataLoader(dataset, sampler=sampler, batch_size=args.batch_size, num_workers=args.num_workers,
                      pin_memory=args.pin_mem and torch.cuda.is_available(), drop_last=train, generator=generator)


def build_classification_loaders(args, train_kind: str) -> tuple[DataLoader, DataLoader, int]:
    """Train and val loaders for fine-tuning / linear probing, and the number of classes: ``args.nb_classes`` when
    given (an error if smaller than the data set's class count), else the data set's count (an error if unknown)."""
    dataset_train = build_dataset("train", args, build_transform(train_kind, args))
    dataset_val = build_dataset("val", args, build_transform("eval", args))
    found = dataset_info(args).num_classes or len(getattr(dataset_train, "classes", ())) or None
    nb_classes = getattr(args, "nb_classes", None)
    if nb_classes is None:
        if not found:
            raise UserError("cannot tell the number of classes of this data set; pass --nb_classes")
        nb_classes = found
    elif found and nb_classes < found:
        raise UserError(f"--nb_classes {nb_classes} is smaller than the {found} classes of the data set")
    print(f"{len(dataset_train)} training and {len(dataset_val)} validation images, {nb_classes} classes")
    if args.dist_eval and len(dataset_val) % distributed.get_world_size():
        print("warning: with --dist_eval the validation set is padded to a multiple of the number of processes, "
              "so a few images count twice")
    return (build_loader(dataset_train, args, train=True),
            build_loader(dataset_val, args, train=False, shard_eval=args.dist_eval), nb_classes)
