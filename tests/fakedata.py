"""Tiny generated data sets in every on-disk format util/datasets.py reads.

Each ``make_*`` function writes into ``root`` (a temporary directory) and
returns the directory to pass as ``--data_path``. Output is deterministic and
takes well under a second. Classes are easy to learn: class k is bright in the
k-th of ``num_classes`` horizontal stripes (for two classes: top half versus
bottom half; horizontal flips keep the class) on a dark, noisy background, so short fine-tuning runs can be
checked to beat chance.
"""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
from PIL import Image


def class_pattern(label: int, num_classes: int, size: int, rng, channels: int = 3) -> np.ndarray:
    """A size x size (x channels) uint8 image whose bright stripe encodes ``label``."""
    stripes = max(1, min(num_classes, size // 2))  # stripes at least 2 px wide
    stripe = label % stripes
    image = rng.normal(40, 15, size=(size, size, channels))
    # horizontal stripes: the class survives the horizontal flips of the training augmentations
    top = stripe * size // stripes
    bottom = (stripe + 1) * size // stripes
    image[top:bottom, :, :] += 170
    if channels == 3 and num_classes > stripes:
        # More classes than stripes (CIFAR-100): tell them apart by tint too.
        image[:, :, (label // stripes) % 3] += 40
    image = np.clip(image, 0, 255).astype(np.uint8)
    return image[:, :, 0] if channels == 1 else image


def make_imagefolder(root, num_classes=2, per_class=8, size=32, splits=("train", "val")) -> str:
    """ImageNet layout: <root>/imagefolder/<split>/class_XX/img_YYY.{png,jpg} (PNG and JPEG alternate)."""
    data_path = os.path.join(os.fspath(root), "imagefolder")
    for split_index, split in enumerate(splits):
        rng = np.random.default_rng(1000 + split_index)
        for label in range(num_classes):
            class_dir = os.path.join(data_path, split, f"class_{label:02d}")
            os.makedirs(class_dir, exist_ok=True)
            for i in range(per_class):
                image = Image.fromarray(class_pattern(label, num_classes, size, rng))
                extension = "png" if i % 2 == 0 else "jpg"
                image.save(os.path.join(class_dir, f"img_{i:03d}.{extension}"))
    return data_path


def _cifar_arrays(n, num_classes, rng):
    labels = [i % num_classes for i in range(n)]
    # torchvision expects rows of 3072 bytes: the 32x32 red plane, then green, then blue.
    images = [class_pattern(label, num_classes, 32, rng).transpose(2, 0, 1).reshape(-1) for label in labels]
    data = np.stack(images) if images else np.zeros((0, 3072), dtype=np.uint8)
    return data, labels


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def make_cifar(root, which="cifar10", n_train=16, n_test=8) -> str:
    """torchvision's pickled CIFAR layout: <root>/cifar/cifar-10-batches-py/ or .../cifar-100-python/.

    torchvision md5-checks every CIFAR file against the official release, which
    generated files can never match. Tests that load these files must therefore
    call ``accept_fake_cifar(monkeypatch)`` first; the library itself keeps the check.
    """
    data_path = os.path.join(os.fspath(root), "cifar")
    rng = np.random.default_rng(7)
    if which == "cifar10":
        num_classes = 10
        folder = os.path.join(data_path, "cifar-10-batches-py")
        os.makedirs(folder, exist_ok=True)
        data, labels = _cifar_arrays(n_train, num_classes, rng)
        # The real training set is split over five batches; so is ours.
        for batch_index, rows in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _write_pickle(os.path.join(folder, f"data_batch_{batch_index}"), {
                "batch_label": f"training batch {batch_index} of 5",
                "labels": [labels[r] for r in rows],
                "data": data[rows],
                "filenames": [f"fake_{r}.png" for r in rows],
            })
        data, labels = _cifar_arrays(n_test, num_classes, rng)
        _write_pickle(os.path.join(folder, "test_batch"), {
            "batch_label": "testing batch 1 of 1",
            "labels": labels,
            "data": data,
            "filenames": [f"fake_test_{i}.png" for i in range(n_test)],
        })
        _write_pickle(os.path.join(folder, "batches.meta"), {
            "label_names": [f"class_{i}" for i in range(num_classes)],
            "num_cases_per_batch": -(-n_train // 5),
            "num_vis": 3072,
        })
    elif which == "cifar100":
        num_classes = 100
        folder = os.path.join(data_path, "cifar-100-python")
        os.makedirs(folder, exist_ok=True)
        for file_name, n in (("train", n_train), ("test", n_test)):
            data, labels = _cifar_arrays(n, num_classes, rng)
            _write_pickle(os.path.join(folder, file_name), {
                "batch_label": f"{file_name}ing batch 1 of 1",
                "fine_labels": labels,
                "coarse_labels": [label // 5 for label in labels],
                "data": data,
                "filenames": [f"fake_{file_name}_{i}.png" for i in range(n)],
            })
        _write_pickle(os.path.join(folder, "meta"), {
            "fine_label_names": [f"fine_{i}" for i in range(num_classes)],
            "coarse_label_names": [f"coarse_{i}" for i in range(num_classes // 5)],
        })
    else:
        raise ValueError(f"which must be 'cifar10' or 'cifar100', not {which!r}")
    return data_path


def accept_fake_cifar(monkeypatch):
    """Let torchvision load make_cifar's files: its md5 check only checks existence.

    torchvision's CIFAR10/CIFAR100 compare each file's md5 with the official
    release (in ``_check_integrity`` and ``_load_meta``, both through the module
    function ``torchvision.datasets.cifar.check_integrity``); patching that one
    function for the test's duration is the narrowest way past it.
    """
    import torchvision.datasets.cifar

    monkeypatch.setattr(
        torchvision.datasets.cifar, "check_integrity", lambda fpath, md5=None: os.path.isfile(fpath)
    )


def make_filelist(root, n=12, size=32, labelled=True) -> str:
    """<root>/filelist/ with images (some names contain spaces) and train.txt / val.txt listing them.

    Each list names ``n`` images of two classes, with a comment and a blank line
    mixed in; with ``labelled=False`` the lines carry no label.
    """
    data_path = os.path.join(os.fspath(root), "filelist")
    num_classes = 2
    for split_index, split in enumerate(("train", "val")):
        rng = np.random.default_rng(2000 + split_index)
        lines = ["# generated by tests/fakedata.py", ""]
        for i in range(n):
            label = i % num_classes
            # Spaces in some paths exercise the "label is the last token" rule.
            rel_path = f"images/{split}/class {label}/img {i}.png" if i % 3 == 0 else f"images/{split}/img_{i}.png"
            full_path = os.path.join(data_path, rel_path)
            os.makedirs(os.path.dirname(full_path), exist_ok=True)
            Image.fromarray(class_pattern(label, num_classes, size, rng)).save(full_path)
            lines.append(f"{rel_path} {label}" if labelled else rel_path)
            if i == n // 2:
                lines.append("")
        with open(os.path.join(data_path, f"{split}.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    return data_path


def write_idx(path, array: np.ndarray) -> None:
    """Write a uint8 array as an idx file (gzipped when ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">u4").tobytes()
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(header + array.tobytes())


def make_fashion_mnist(root, n_train=32, n_test=16, gz=False) -> str:
    """The four Fashion-MNIST idx files (28x28 grayscale, 10 classes) in <root>/fashion_mnist/."""
    data_path = os.path.join(os.fspath(root), "fashion_mnist")
    os.makedirs(data_path, exist_ok=True)
    suffix = ".gz" if gz else ""
    rng = np.random.default_rng(3)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        images = np.stack([class_pattern(int(label), 10, 28, rng, channels=1) for label in labels])
        write_idx(os.path.join(data_path, f"{prefix}-images-idx3-ubyte{suffix}"), images)
        write_idx(os.path.join(data_path, f"{prefix}-labels-idx1-ubyte{suffix}"), labels)
    return data_path
