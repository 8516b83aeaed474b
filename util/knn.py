"""The kNN monitor of pretraining: a weighted k-nearest-neighbour classifier on frozen features (InstDisc, DINO).
Each query's k most cosine-similar memory-bank items vote for their class with weight exp(similarity / T)."""
import torch
import torch.nn.functional as F
from torch.utils.data import Subset

from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError
from util.loader import build_loader

K, TEMPERATURE = 20, 0.07  # DINO's protocol (k 20 of its 10, 20, 100, 200), InstDisc's temperature


def knn_scores(bank_features, bank_labels, query_features, num_classes: int, k: int = K,
               temperature: float = TEMPERATURE, chunk: int = 4096) -> torch.Tensor:
    """Summed vote weights (Q, num_classes) of each query's k nearest memory-bank items (cosine similarity)."""
    bank = F.normalize(bank_features.float(), dim=1)
    votes = []
    for queries in F.normalize(query_features.float(), dim=1).split(chunk):  # bounds the (chunk, bank) matrix
        similarity, nearest = (queries @ bank.T).topk(min(k, len(bank)), dim=1)
        weights = (similarity / temperature).exp()
        votes.append(torch.zeros(len(queries), num_classes).scatter_add_(1, bank_labels[nearest], weights))
    return torch.cat(votes)


def knn_accuracy(bank_features, bank_labels, query_features, query_labels) -> float:
    """Top-1 accuracy in % of the weighted kNN classifier (k = K, T = TEMPERATURE)."""
    num_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    predicted = knn_scores(bank_features, bank_labels, query_features, num_classes).argmax(dim=1)
    return 100.0 * (predicted == query_labels).double().mean().item()


def build_knn_loaders(args) -> list:
    """Evaluation loaders, sharded over ranks: ``--knn_train_images`` training images spread evenly over the split
    (a class-sorted folder gives every class) as the memory bank, and the validation split as the queries."""
    plain = build_transform("eval", args)
    bank, queries = build_dataset("train", args, plain), build_dataset("val", args, plain)
    for split, dataset in (("train", bank), ("val", queries)):
        if not (dataset_info(args).num_classes or getattr(dataset, "classes", None)):
            raise UserError(f"--knn_freq needs labelled images, but the {split} split of --dataset {args.dataset} "
                            f"({args.data_path}) has no labels; pass --knn_freq 0")
    if 0 < args.knn_train_images < len(bank):
        bank = Subset(bank, [i * len(bank) // args.knn_train_images for i in range(args.knn_train_images)])
    return [build_loader(dataset, args, train=False, shard_eval=True) for dataset in (bank, queries)]
