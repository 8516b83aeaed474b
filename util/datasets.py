"""Datasets and image transforms for pre-training, fine-tuning and linear probing.

``--dataset``: ``imagefolder`` (``DATA_PATH/{train,val}/CLASS/IMAGE``); ``cifar10`` / ``cifar100`` (torchvision's
files); ``filelist`` (``--train_list`` / ``--val_list``, default ``DATA_PATH/{train,val}.txt``); ``fashion_mnist`` (idx
files, optionally .gz, in DATA_PATH, DATA_PATH/FashionMNIST/raw or ``DEBIAN_FASHION_MNIST_DIR``; one channel). A data
problem the user must fix raises ``UserError``, one line naming the file at fault."""
import gzip
import math
import os
import warnings
from collections import namedtuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from timm.data import auto_augment, create_transform
from torchvision import datasets as tv_datasets
from torchvision import io as tv_io
from torchvision import transforms

from util.errors import UserError

DATASETS = ("imagefolder", "cifar10", "cifar100", "filelist", "fashion_mnist")
TRANSFORM_KINDS = ("pretrain", "finetune", "linprobe", "eval")
SMALL_IMAGE_MAX_SIZE = 64
BICUBIC = transforms.InterpolationMode.BICUBIC

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN, FASHION_MNIST_STD = (0.2860,), (0.3530,)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
                       "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # a module attribute: tests point it elsewhere
DataInfo = namedtuple("DataInfo", "mean std in_chans num_classes")  # num_classes None: count the data's classes


def dataset_info(args) -> DataInfo:
    name = _dataset_name(args)
    if name == "fashion_mnist":
        return DataInfo(FASHION_MNIST_MEAN, FASHION_MNIST_STD, in_chans=1, num_classes=10)
    # ImageNet statistics for every RGB set: the released checkpoints were trained with them.
    return DataInfo(IMAGENET_MEAN, IMAGENET_STD, in_chans=3, num_classes={"cifar10": 10, "cifar100": 100}.get(name))


def _dataset_name(args) -> str:
    name = getattr(args, "dataset", None) or "imagefolder"
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    return name


def build_transform(kind: str, args):
    """Above 64 px, the original's: RandomResizedCrop (scale 0.2-1) and a flip for pre-training, its own single-draw
    crop (0.08-1) and a flip for linear probing, timm's RandAugment / RandomErasing for fine-tuning, a bicubic resize
    and a center crop for evaluation. Up to 64 px (CIFAR, Fashion-MNIST): random crops with reflect
    padding (``args.crop_padding`` px, default size / 8; 0: none) and flips (fine-tuning adds RandAugment /
    RandomErasing when asked); evaluation has no center-crop margin."""
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind '{kind}': expected one of {TRANSFORM_KINDS}")
    info, size = dataset_info(args), int(args.input_size)
    to_tensor = [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]
    padding = getattr(args, "crop_padding", None)
    if padding is not None and size > SMALL_IMAGE_MAX_SIZE:
        raise UserError(f"--crop_padding applies to images up to {SMALL_IMAGE_MAX_SIZE} px, not --input_size {size}")
    if size <= SMALL_IMAGE_MAX_SIZE:  # Resize leaves an image of the right size alone; the center crop squares others
        steps = [transforms.Resize(size, interpolation=BICUBIC), transforms.CenterCrop(size)]
        padding = size // 8 if padding is None else padding
        if kind != "eval":
            steps += [transforms.RandomCrop(size, padding=padding, padding_mode="reflect")] if padding else []
            steps += [transforms.RandomHorizontalFlip()]
        if kind != "finetune":
            return transforms.Compose(steps + to_tensor)
        _, augment, finish = _timm_finetune_transform(size, info, args, separate=True)  # all but timm's crop and flip
        return _allow_zero_bit_posterize(transforms.Compose(steps + augment.transforms + finish.transforms))
    if kind == "pretrain":
        return CropFlipNormalize(size, (0.2, 1.0), info.mean, info.std)
    if kind == "linprobe":
        return CropFlipNormalize(size, (0.08, 1.0), info.mean, info.std, crop=SingleDrawRandomResizedCrop)
    if kind == "finetune":
        return _allow_zero_bit_posterize(_timm_finetune_transform(size, info, args))
    crop_pct = 224 / 256 if size <= 224 else 1.0  # the original's evaluation margin up to 224 px; none above
    return transforms.Compose([transforms.Resize(int(size / crop_pct), interpolation=BICUBIC),
                               transforms.CenterCrop(size)] + to_tensor)


def _timm_finetune_transform(size, info, args, separate=False):
    policy = getattr(args, "aa", None)
    return create_transform(
        input_size=size, is_training=True, color_jitter=getattr(args, "color_jitter", None),
        auto_augment=None if not policy or str(policy).lower() == "none" else policy, interpolation="bicubic",
        re_prob=getattr(args, "reprob", 0.0) or 0.0, re_mode=getattr(args, "remode", "pixel"),
        re_count=getattr(args, "recount", 1), mean=info.mean, std=info.std, separate=separate)


def posterize_allowing_zero_bits(img, bits_to_keep, **_):
    """timm's posterize op, also accepting ``bits_to_keep == 0`` (an all-black image, as older Pillow gave): timm's
    "inc" RandAugment asks for it at magnitude 10, and Pillow 13's ValueError there would crash a fine-tuning run."""
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return img if bits_to_keep >= 8 else ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform):
    for step in getattr(transform, "transforms", []):  # ops: RandAugment, AugMix; policy: AutoAugment's sub-policies
        for op in list(getattr(step, "ops", [])) + [op for sub in getattr(step, "policy", []) for op in sub]:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_allowing_zero_bits
    return transform


def load_rgb_image(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            return img if img.mode == "RGB" else img.convert("RGB")  # convert() copies even an RGB image
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {path}: not a recognised image format") from None
    except Exception as exc:  # truncated data, bad headers, unreadable file: all the file's fault
        raise UserError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def read_rgb_tensor(path: str):
    """An image file as a uint8 (3, H, W) tensor decoded by ``torchvision.io`` (one copy fewer than PIL); what it
    cannot decode (other formats, 16-bit or animated images, broken files) goes through ``load_rgb_image``."""
    try:
        img = tv_io.decode_image(path, mode=tv_io.ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return load_rgb_image(path)
    return img if img.dtype == torch.uint8 and img.ndim == 3 and img.shape[0] == 3 else load_rgb_image(path)


class SingleDrawRandomResizedCrop(transforms.RandomResizedCrop):
    """The original linear probe's crop: one draw of area and log-uniform aspect ratio, clamped to the image, uniform
    offsets. torchvision's retries and falls back to a center crop: mean area 0.43 of a 500 x 375 image, not 0.52."""

    @staticmethod
    def get_params(img, scale, ratio):
        _, height, width = transforms.functional.get_dimensions(img)
        area = height * width * torch.empty(1).uniform_(scale[0], scale[1]).item()
        aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
        w = min(max(1, round(math.sqrt(area * aspect))), width)
        h = min(max(1, round(math.sqrt(area / aspect))), height)
        top = int(torch.randint(0, height - h + 1, size=(1,)).item())
        left = int(torch.randint(0, width - w + 1, size=(1,)).item())
        return top, left, h, w


class CropFlipNormalize(transforms.Compose):
    """``Compose(self.transforms)``: ``crop`` (bicubic), flip, ToTensor, Normalize, in fewer passes over a uint8
    (C, H, W) tensor (``image_loader``) or a PIL 'RGB' / 'L' image: the same draws cut the same box, resized by torch's
    antialiased bicubic kernel (within a few grey levels of PIL's), normalised in one multiply-add. Else plain steps."""

    def __init__(self, size: int, scale, mean, std, ratio=(3.0 / 4.0, 4.0 / 3.0), crop=transforms.RandomResizedCrop):
        super().__init__([crop(size, scale=scale, ratio=ratio, interpolation=BICUBIC),
                          transforms.RandomHorizontalFlip(), transforms.ToTensor(), transforms.Normalize(mean, std)])
        std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)  # (x / 255 - mean) / std == x * gain + bias
        self._gain = 1.0 / (255.0 * std)
        self._bias = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std

    image_loader = staticmethod(read_rgb_tensor)

    def __call__(self, img):
        pixels = self._uint8_chw(img)
        if pixels is None:
            return super().__call__(img)
        crop, flip = self.transforms[0], self.transforms[1]
        top, left, height, width = crop.get_params(pixels, crop.scale, crop.ratio)
        box = pixels[:, top:top + height, left:left + width].unsqueeze(0)
        out = torch.nn.functional.interpolate(box, size=crop.size, mode="bicubic", antialias=True)[0]
        out = out.flip(-1) if torch.rand(1) < flip.p else out
        return torch.addcmul(self._bias, out.to(torch.float32, memory_format=torch.contiguous_format), self._gain)

    @staticmethod
    def _uint8_chw(img):
        """A uint8 (C, H, W) view of (H, W, C) memory (what torch's uint8 resize reads fastest), or None."""
        if isinstance(img, torch.Tensor):
            return img if img.dtype == torch.uint8 and img.ndim == 3 else None
        if not isinstance(img, Image.Image) or img.mode not in ("RGB", "L"):
            return None
        with warnings.catch_warnings():  # np.asarray's array is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(img))
        return (pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels).permute(2, 0, 1)


def build_dataset(split: str, args, transform=None):
    """The ``split`` ("train" or "val") of ``args.dataset``: (image, label) pairs, by default for evaluation."""
    if split not in ("train", "val"):
        raise ValueError(f"unknown split '{split}': expected 'train' or 'val'")
    name = _dataset_name(args)
    transform = build_transform("eval", args) if transform is None else transform
    loader = getattr(transform, "image_loader", load_rgb_image)
    if name == "imagefolder":
        split_dir = os.path.join(_data_path(args), split)
        hint = "expected class sub-folders with images (ImageFolder layout)"
        if not os.path.isdir(split_dir):
            raise UserError(f"no images found in {split_dir}: the directory does not exist; {hint}")
        try:
            return tv_datasets.ImageFolder(split_dir, transform, loader=loader)
        except FileNotFoundError:  # torchvision's "no class folders" / "no images"
            raise UserError(f"no images found in {split_dir}: {hint}") from None
    if name == "filelist":
        root = _data_path(args)
        list_file = getattr(args, f"{split}_list", None) or os.path.join(root, f"{split}.txt")
        paths, labels = zip(*parse_file_list(root, list_file))
        return LabelledImages(list(paths), labels, [str(i) for i in range(max(labels) + 1)],  # none if unlabelled
                              loader, transform, source=list_file)
    if name == "fashion_mnist":
        return _build_fashion_mnist(split, args, transform)
    cifar_class = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.CIFAR100
    root, download = _data_path(args), bool(getattr(args, "download", False))
    expected_dir = os.path.join(root, cifar_class.base_folder)
    if not download and not os.path.isdir(expected_dir):
        raise UserError(f"{name} not found: expected torchvision's files in {expected_dir}; pass --download (online)")
    try:
        return cifar_class(root=root, train=(split == "train"), transform=transform, download=download)
    except RuntimeError:  # torchvision's "not found or corrupted": a failed md5 check or a missing batch
        raise UserError(f"{name} files in {expected_dir} are missing or corrupted (md5 check failed); "
                        f"delete the folder and pass --download") from None
    except OSError as exc:  # network failure during the download
        raise UserError(f"downloading {name} into {root} failed: {exc}") from None


def _data_path(args) -> str:
    data_path = getattr(args, "data_path", None)
    if not data_path:
        raise UserError(f"--data_path is required for --dataset {_dataset_name(args)}")
    return os.fspath(data_path)


class LabelledImages(torch.utils.data.Dataset):
    """The image ``load(item)`` and the integer label of each of ``items`` (file paths, arrays)."""

    def __init__(self, items, targets, classes, load, transform, source: str):
        self.items, self.targets, self.classes, self.load = items, [int(t) for t in targets], list(classes), load
        self.transform, self.source = transform, source

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = self.load(self.items[index])
        return (img if self.transform is None else self.transform(img)), self.targets[index]

    def __repr__(self):
        return f"{type(self).__name__}(source={self.source}, samples={len(self)}, classes={len(self.classes)})"


def parse_file_list(root: str, list_file: str) -> list[tuple[str, int]]:
    """``list_file`` as (path under ``root``, label) pairs: a line's last token is its label if an integer, else the
    line is a path (spaces allowed) labelled -1. Blank and '#' lines are skipped; labels on all lines or on none."""
    if not os.path.isfile(list_file):
        raise UserError(f"list file {list_file} does not exist")
    samples, first = [], None  # first: (line number, labelled?) of the first entry
    with open(list_file, encoding="utf-8") as f:
        for line_number, line in enumerate(f, start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            try:
                rel_path, label = parts[0], int(parts[1])
            except (IndexError, ValueError):
                rel_path, label = line, None
            where = f"{list_file}:{line_number}"
            if label is not None and label < 0:
                raise UserError(f"{where}: label {label} is negative")
            first = first or (line_number, label is not None)
            if first[1] != (label is not None):
                raise UserError(f"{where}: line is {'labelled' if label is not None else 'unlabelled'} but line "
                                f"{first[0]} is not; give every line a label or none")
            path = os.path.join(root, rel_path)
            if not os.path.isfile(path):
                raise UserError(f"{where}: image {path} not found")
            samples.append((path, -1 if label is None else label))
    if not samples:
        raise UserError(f"list file {list_file} lists no images")
    return samples


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # gzip's BadGzipFile and truncated streams too
        raise UserError(f"cannot read idx file {path}: {exc}") from None
    # Header: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, one big-endian uint32 each.
    if len(raw) < 4 or raw[:3] != b"\x00\x00\x08" or raw[3] != expected_ndim:
        raise UserError(f"{path} is not an idx file of {expected_ndim}-D unsigned bytes "
                        f"(magic {raw[:4].hex() or 'empty'}, expected 000008{expected_ndim:02x})")
    header_size = 4 + 4 * expected_ndim
    if len(raw) < header_size:
        raise UserError(f"idx file {path} is truncated: header incomplete")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    size = header_size + int(np.prod(shape))
    if len(raw) != size:
        raise UserError(f"idx file {path} is truncated or corrupt: {len(raw)} bytes, expected {size} for shape {shape}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _locate_fashion_mnist(split: str, dirs: list[str]) -> tuple[str, str] | None:
    """(images path, labels path) from the first of ``dirs`` holding both idx files of ``split``, plain or .gz."""
    for directory in dirs:
        found = [next((p for p in (os.path.join(directory, name), os.path.join(directory, name + ".gz"))
                       if os.path.isfile(p)), None) for name in FASHION_MNIST_FILES[split]]
        if all(found):
            return found[0], found[1]
    return None


def _build_fashion_mnist(split, args, transform):
    data_path = os.fspath(args.data_path) if getattr(args, "data_path", None) else None
    dirs = [data_path, os.path.join(data_path, "FashionMNIST", "raw")] if data_path else []
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    found = _locate_fashion_mnist(split, dirs)
    if found is None and getattr(args, "download", False):
        if not data_path:
            raise UserError("--download needs --data_path to say where Fashion-MNIST goes")
        try:  # torchvision downloads and md5-checks into <data_path>/FashionMNIST/raw, a place searched here
            tv_datasets.FashionMNIST(root=data_path, train=(split == "train"), download=True)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"downloading Fashion-MNIST into {data_path} failed: {exc}") from None
        found = _locate_fashion_mnist(split, dirs)
    if found is None:
        raise UserError(f"Fashion-MNIST {split} files ({' and '.join(FASHION_MNIST_FILES[split])}, optionally .gz) "
                        f"not found in {', '.join(dirs)}: apt-get install dataset-fashion-mnist, or pass --download "
                        f"on a machine with internet")
    images_path, labels_path = found
    images, labels = read_idx(images_path, expected_ndim=3), read_idx(labels_path, expected_ndim=1)
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{labels_path} has label {labels.max()}, expected 0..9")
    return LabelledImages(images, labels, FASHION_MNIST_CLASSES, Image.fromarray, transform,  # 'L' images
                          source=os.path.dirname(images_path))
