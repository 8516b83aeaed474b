"""Datasets and image transforms for pre-training, fine-tuning and linear probing.

Supported ``--dataset`` values (see ``DATASETS``):

* ``imagefolder``   ImageNet layout: ``<data_path>/train/<class>/*.jpg`` and
                    ``<data_path>/val/<class>/*.jpg``.
* ``cifar10``/``cifar100``  torchvision's on-disk format under ``<data_path>``
                    (``cifar-10-batches-py/`` or ``cifar-100-python/``);
                    ``--download`` fetches it.
* ``filelist``      ``<data_path>`` plus list files (``--train_list``/``--val_list``,
                    default ``<data_path>/train.txt`` and ``val.txt``), one image path
                    per line relative to ``<data_path>``, optionally followed by an
                    integer label. Unlabelled lists yield label -1 (enough for
                    pre-training).
* ``fashion_mnist`` the raw idx files, searched in ``<data_path>``, then
                    ``<data_path>/FashionMNIST/raw`` (torchvision's download layout),
                    then ``/usr/share/datasets/fashion-mnist`` (Debian package
                    ``dataset-fashion-mnist``). Grayscale: one input channel.

Transforms: the small/large rule
--------------------------------
For ``input_size > 64`` the transforms are those of the original MAE code
(torchvision's RandomResizedCrop with scale (0.2, 1) for pre-training, the
original's single-draw RandomResizedCrop (``SingleDrawRandomResizedCrop``) for
linear probing, timm's RandAugment/RandomErasing recipe for fine-tuning, and
for evaluation a bicubic resize to ``input_size / crop_pct`` and a center crop,
with crop_pct 224/256 up to 224 px and 1 above, as the original).

For ``input_size <= 64`` (CIFAR at 32 px, Fashion-MNIST at 28 px) those recipes
do not fit: a scale-0.2 RandomResizedCrop of a 32-px image is a 14-px blob
blown back up, and upsampling to 224 px would cost ~49x the compute for no new
information. Small images are therefore only resized when their native size
differs from ``input_size``, and training uses the standard small-image
augmentation: a random crop with reflect padding of ``input_size // 8`` plus a
horizontal flip (fine-tuning adds RandAugment and RandomErasing when asked).
Evaluation of small images does no cropping.

The large-image pretraining and linear-probing transforms (``CropFlipNormalize``)
compute torchvision's RandomResizedCrop / flip / ToTensor / Normalize with the
same random draws, about twice as fast per loader worker; image files for them
are decoded straight to tensors (``read_rgb_tensor``). See BENCHMARKS.md.

Every user-facing data problem (missing directory, unreadable image, bad list
line, truncated idx file, ...) raises ``UserError`` with a one-line message
that names the offending file, so the programs can print it instead of a
traceback.
"""

from __future__ import annotations

import gzip
import math
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torchvision import datasets as tv_datasets
from torchvision import io as tv_io
from torchvision import transforms

from util.errors import UserError

DATASETS = ("imagefolder", "cifar10", "cifar100", "filelist", "fashion_mnist")
TRANSFORM_KINDS = ("pretrain", "finetune", "linprobe", "eval")
SPLITS = ("train", "val")

# Up to this size images count as "small" (see module docstring).
SMALL_IMAGE_MAX_SIZE = 64
# The original MAE evaluation: resize to input_size / crop_pct, then center-crop input_size.
EVAL_CROP_PCT = 224 / 256  # input_size <= 224; above it, crop_pct is 1 (no margin)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

# Where Debian's dataset-fashion-mnist package installs the idx files.
# A module attribute so tests can point it elsewhere.
DEBIAN_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_INSTALL_HINT = (
    "apt-get install dataset-fashion-mnist, or pass --download on a machine with internet"
)


@dataclass(frozen=True)
class DataInfo:
    mean: tuple
    std: tuple
    in_chans: int
    num_classes: int | None  # None: count it from the data (imagefolder, filelist)


def dataset_info(args) -> DataInfo:
    name = _dataset_name(args)
    if name == "fashion_mnist":
        return DataInfo(FASHION_MNIST_MEAN, FASHION_MNIST_STD, in_chans=1, num_classes=10)
    # ImageNet statistics for every RGB set: the released MAE checkpoints were
    # trained with them, so fine-tuning from those weights expects them.
    num_classes = {"cifar10": 10, "cifar100": 100}.get(name)
    return DataInfo(IMAGENET_MEAN, IMAGENET_STD, in_chans=3, num_classes=num_classes)


def _dataset_name(args) -> str:
    name = getattr(args, "dataset", None) or "imagefolder"
    if name not in DATASETS:
        raise UserError(f"unknown dataset '{name}': choose one of {', '.join(DATASETS)}")
    return name


# ---------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------

class ResizeIfNeeded:
    """Resize to ``size`` x ``size`` only when the image is not that size already.

    Square images are resized directly; others get their shorter side resized
    and are then center-cropped, so the output is always square.
    """

    def __init__(self, size: int, interpolation=transforms.InterpolationMode.BICUBIC):
        self.size = size
        self.interpolation = interpolation

    def __call__(self, img):
        width, height = img.size
        if width == height == self.size:
            return img
        if width == height:
            return transforms.functional.resize(img, [self.size, self.size], self.interpolation)
        img = transforms.functional.resize(img, self.size, self.interpolation)
        return transforms.functional.center_crop(img, [self.size, self.size])

    def __repr__(self):
        return f"{type(self).__name__}(size={self.size}, interpolation={self.interpolation.value})"


def build_transform(kind: str, args):
    if kind not in TRANSFORM_KINDS:
        raise ValueError(f"unknown transform kind '{kind}': expected one of {TRANSFORM_KINDS}")
    info = dataset_info(args)
    input_size = int(args.input_size)
    if input_size <= SMALL_IMAGE_MAX_SIZE:
        return _small_image_transform(kind, input_size, info, args)
    return _large_image_transform(kind, input_size, info, args)


def _to_normalized_tensor(info: DataInfo):
    return [transforms.ToTensor(), transforms.Normalize(info.mean, info.std)]


def _large_image_transform(kind, input_size, info, args):
    bicubic = transforms.InterpolationMode.BICUBIC
    if kind == "finetune":
        import timm.data

        transform = timm.data.create_transform(
            input_size=input_size,
            is_training=True,
            color_jitter=getattr(args, "color_jitter", None),
            auto_augment=_auto_augment_policy(args),
            interpolation="bicubic",
            re_prob=getattr(args, "reprob", 0.0),
            re_mode=getattr(args, "remode", "pixel"),
            re_count=getattr(args, "recount", 1),
            mean=info.mean,
            std=info.std,
        )
        return _allow_zero_bit_posterize(transform)
    if kind == "pretrain":
        return CropFlipNormalize(input_size, scale=(0.2, 1.0), mean=info.mean, std=info.std)
    if kind == "linprobe":
        return CropFlipNormalize(input_size, scale=(0.08, 1.0), mean=info.mean, std=info.std,
                                 crop=SingleDrawRandomResizedCrop)
    crop_pct = EVAL_CROP_PCT if input_size <= 224 else 1.0
    steps = [  # eval
        transforms.Resize(int(input_size / crop_pct), interpolation=bicubic),
        transforms.CenterCrop(input_size),
    ]
    return transforms.Compose(steps + _to_normalized_tensor(info))


class SingleDrawRandomResizedCrop(transforms.RandomResizedCrop):
    """The original linear probe's RandomResizedCrop: one draw of area and log-uniform aspect ratio, the box
    clamped to the image, uniform offsets; no retries and no center-crop fallback (torchvision's has both, and
    its crops are smaller on average: 0.43 of a 500 x 375 image against 0.52)."""

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
    """``RandomResizedCrop(bicubic) -> RandomHorizontalFlip -> ToTensor -> Normalize``, computed in fewer passes.

    ``crop`` is the RandomResizedCrop class (torchvision's, or ``SingleDrawRandomResizedCrop``; its ``get_params``
    draws the box). ``transforms`` lists the plain steps, and they define the result: the same random draws in the same
    order (crop box, then flip), so a seeded call cuts the same box as ``Compose(self.transforms)``. Only the
    arithmetic is faster (see BENCHMARKS.md): the box is a view of the decoded uint8 pixels, resized by torch's
    antialiased bicubic uint8 kernel (PIL's filter, vectorised; pixels within a few grey levels of PIL's) instead
    of PIL's scalar resampler, and conversion to float and normalisation are one multiply-add on the small
    result. Input: a uint8 (C, H, W) tensor (what :func:`read_rgb_tensor`, this transform's ``image_loader``,
    gives) or a PIL 'RGB' / 'L' image; anything else goes through the plain steps.
    """

    FAST_MODES = ("RGB", "L")

    def __init__(self, size: int, scale, mean, std, ratio=(3.0 / 4.0, 4.0 / 3.0), crop=transforms.RandomResizedCrop):
        crop = crop(size, scale=scale, ratio=ratio, interpolation=transforms.InterpolationMode.BICUBIC)
        super().__init__([crop, transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                          transforms.Normalize(mean, std)])
        # (x / 255 - mean) / std  ==  x * gain + bias
        std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self._gain = 1.0 / (255.0 * std)
        self._bias = -torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1) / std

    @staticmethod
    def image_loader(path: str):
        return read_rgb_tensor(path)

    def __call__(self, img):
        pixels = self._uint8_chw(img)
        if pixels is None:
            return super().__call__(img)
        crop, flip = self.transforms[0], self.transforms[1]
        top, left, height, width = crop.get_params(pixels, crop.scale, crop.ratio)
        box = pixels[:, top:top + height, left:left + width].unsqueeze(0)
        out = torch.nn.functional.interpolate(box, size=crop.size, mode="bicubic", antialias=True)[0]
        if torch.rand(1) < flip.p:
            out = out.flip(-1)
        return torch.addcmul(self._bias, out.to(torch.float32, memory_format=torch.contiguous_format), self._gain)

    def _uint8_chw(self, img):
        """The pixels as a uint8 (C, H, W) tensor without copying them again, or None for the plain path.
        From PIL (and from torchvision's JPEG decoder) it is a view of (H, W, C) memory: the channels-last
        layout that torch's vectorised uint8 resize reads directly."""
        if isinstance(img, torch.Tensor):
            return img if img.dtype == torch.uint8 and img.ndim == 3 else None
        if not isinstance(img, Image.Image) or img.mode not in self.FAST_MODES:
            return None
        with warnings.catch_warnings():  # np.asarray's copy is read-only; nothing here writes to it
            warnings.simplefilter("ignore", UserWarning)
            pixels = torch.from_numpy(np.asarray(img))
        return (pixels.unsqueeze(-1) if pixels.ndim == 2 else pixels).permute(2, 0, 1)


def _small_image_transform(kind, input_size, info, args):
    steps = [ResizeIfNeeded(input_size)]
    if kind == "eval":
        return transforms.Compose(steps + _to_normalized_tensor(info))

    steps += [
        transforms.RandomCrop(input_size, padding=input_size // 8, padding_mode="reflect"),
        transforms.RandomHorizontalFlip(),
    ]
    erasing = []
    if kind == "finetune":
        policy = _auto_augment_policy(args)
        color_jitter = getattr(args, "color_jitter", None)
        if policy:
            steps.append(_auto_augment_transform(policy, input_size, info))
        elif color_jitter:
            # As in timm: colour jitter only when no RandAugment is used.
            steps.append(transforms.ColorJitter(color_jitter, color_jitter, color_jitter))
        reprob = getattr(args, "reprob", 0.0) or 0.0
        if reprob > 0:
            from timm.data.random_erasing import RandomErasing

            erasing.append(
                RandomErasing(
                    reprob,
                    mode=getattr(args, "remode", "pixel"),
                    max_count=getattr(args, "recount", 1),
                    device="cpu",
                )
            )
    return _allow_zero_bit_posterize(transforms.Compose(steps + _to_normalized_tensor(info) + erasing))


def _auto_augment_transform(policy: str, input_size: int, info: DataInfo):
    """timm's RandAugment / AugMix / AutoAugment for ``policy``, with the hparams timm itself would use."""
    from timm.data import auto_augment

    hparams = dict(
        translate_const=int(input_size * 0.45),
        # Fill colour for rotate/shear/translate, one value per channel: a
        # single value is also what PIL needs for grayscale ('L') images.
        img_mean=tuple(min(255, round(255 * m)) for m in info.mean),
        interpolation=Image.Resampling.BICUBIC,
    )
    if policy.startswith("rand"):
        return auto_augment.rand_augment_transform(policy, hparams)
    if policy.startswith("augmix"):
        return auto_augment.augment_and_mix_transform(policy, dict(hparams, translate_pct=0.3))
    return auto_augment.auto_augment_transform(policy, hparams)


def posterize_allowing_zero_bits(img, bits_to_keep, **_):
    """timm's posterize op, also accepting ``bits_to_keep == 0`` (an all-black image).

    timm's "inc" RandAugment maps magnitude 10 to 0 bits; the default policy
    rand-m9-mstd0.5 reaches it in ~2% of the draws. Older Pillow turned that
    into a black image; Pillow 13 raises ValueError instead, which crashes a
    fine-tuning run (about 1 image in 1000 with the default policy) within its
    first ImageNet epoch. This gives the old result on every Pillow.
    """
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)  # zero in every channel, as old Pillow produced
    if bits_to_keep >= 8:
        return img
    return ImageOps.posterize(img, bits_to_keep)


def _allow_zero_bit_posterize(transform):
    """Swap timm's posterize for ``posterize_allowing_zero_bits`` in every augmentation op of ``transform``."""
    from timm.data import auto_augment

    for step in getattr(transform, "transforms", []):
        ops = list(getattr(step, "ops", []))  # RandAugment, AugMix
        for sub_policy in getattr(step, "policy", []):  # AutoAugment
            ops.extend(sub_policy)
        for op in ops:
            if getattr(op, "aug_fn", None) is auto_augment.posterize:
                op.aug_fn = posterize_allowing_zero_bits
    return transform


def _auto_augment_policy(args):
    policy = getattr(args, "aa", None)
    if not policy or str(policy).lower() == "none":
        return None
    return policy


# ---------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------

def build_dataset(split: str, args, transform=None):
    """Return the ``split`` ("train" or "val") of ``args.dataset`` as (image, int label) pairs.

    ``transform`` defaults to the evaluation transform; training callers pass
    ``build_transform("pretrain" | "finetune" | "linprobe", args)``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split '{split}': expected one of {SPLITS}")
    name = _dataset_name(args)
    if transform is None:
        transform = build_transform("eval", args)
    builders = {
        "imagefolder": _build_imagefolder,
        "cifar10": _build_cifar,
        "cifar100": _build_cifar,
        "filelist": _build_filelist,
        "fashion_mnist": _build_fashion_mnist,
    }
    return builders[name](split, args, transform)


def _data_path(args) -> str:
    data_path = getattr(args, "data_path", None)
    if not data_path:
        raise UserError(f"--data_path is required for --dataset {_dataset_name(args)}")
    return os.fspath(data_path)


def load_rgb_image(path: str) -> Image.Image:
    """Open an image file as RGB; a broken file becomes a UserError naming it."""
    try:
        with open(path, "rb") as f:
            img = Image.open(f)
            img.load()
            # convert() copies even when there is nothing to convert; most photos are RGB already
            return img if img.mode == "RGB" else img.convert("RGB")
    except UnidentifiedImageError:
        raise UserError(f"cannot read image {path}: not a recognised image format") from None
    except Exception as exc:  # truncated data, bad headers, unreadable file: all the file's fault
        raise UserError(f"cannot read image {path}: {type(exc).__name__}: {exc}") from None


def read_rgb_tensor(path: str):
    """An image file as a uint8 (3, H, W) tensor, decoded by ``torchvision.io`` (libjpeg-turbo, as PIL; for JPEG
    the tensor is a view of the decoder's (H, W, 3) output, where PIL's ``np.asarray`` copies it once more).
    What it cannot decode (formats it lacks, 16-bit or animated images, broken files) goes through
    :func:`load_rgb_image`: PIL's image, or a UserError naming the file. (torchvision 0.29 marks its decoders
    deprecated in favour of TorchCodec's ``decode_image``, the same call; switch when that is a dependency.)"""
    try:
        img = tv_io.decode_image(path, mode=tv_io.ImageReadMode.RGB)
    except (RuntimeError, ValueError):
        return load_rgb_image(path)
    if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[0] != 3:
        return load_rgb_image(path)
    return img


def image_loader_for(transform):
    """The file loader a transform wants: its ``image_loader`` (tensors) when it has one, else PIL RGB."""
    return getattr(transform, "image_loader", load_rgb_image)


def _build_imagefolder(split, args, transform):
    split_dir = os.path.join(_data_path(args), split)
    hint = "expected class sub-folders with images (ImageFolder layout)"
    if not os.path.isdir(split_dir):
        raise UserError(f"no images found in {split_dir}: the directory does not exist; {hint}")
    try:
        return tv_datasets.ImageFolder(split_dir, transform=transform, loader=image_loader_for(transform))
    except FileNotFoundError:  # raised by torchvision for no class folders / no images
        raise UserError(f"no images found in {split_dir}: {hint}") from None


def _build_cifar(split, args, transform):
    name = _dataset_name(args)
    cifar_class = tv_datasets.CIFAR10 if name == "cifar10" else tv_datasets.CIFAR100
    root = _data_path(args)
    download = bool(getattr(args, "download", False))
    expected_dir = os.path.join(root, cifar_class.base_folder)
    if not download and not os.path.isdir(expected_dir):
        raise UserError(
            f"{name} not found: expected torchvision's files in {expected_dir}; "
            f"pass --download to fetch them (needs internet)"
        )
    try:
        return cifar_class(root=root, train=(split == "train"), transform=transform, download=download)
    except RuntimeError:  # torchvision's "not found or corrupted" (md5 mismatch or missing batch)
        raise UserError(
            f"{name} files in {expected_dir} are missing or corrupted (md5 check failed); "
            f"delete the folder and pass --download"
        ) from None
    except OSError as exc:  # network failure during download
        raise UserError(f"downloading {name} into {root} failed: {exc}") from None


class FileListDataset(torch.utils.data.Dataset):
    """Images listed in a text file, relative to ``root``; see ``parse_file_list``."""

    def __init__(self, root: str, list_file: str, transform=None):
        self.root = root
        self.list_file = list_file
        self.transform = transform
        self.samples = parse_file_list(root, list_file)
        self.targets = [label for _, label in self.samples]
        labelled = bool(self.targets) and self.targets[0] >= 0
        num_classes = max(self.targets) + 1 if labelled else 0
        self.classes = [str(i) for i in range(num_classes)]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        img = image_loader_for(self.transform)(path)
        if self.transform is not None:
            img = self.transform(img)
        return img, label

    def __repr__(self):
        return (f"{type(self).__name__}(list_file={self.list_file}, root={self.root}, "
                f"samples={len(self)}, classes={len(self.classes)})")


def parse_file_list(root: str, list_file: str) -> list[tuple[str, int]]:
    """Read ``list_file`` into (absolute path, label) pairs.

    One image per line, relative to ``root``. The last whitespace-separated
    token is the label if it parses as an integer; otherwise the whole line is
    the path (so paths may contain spaces) and the label is -1. Blank lines and
    lines starting with '#' are skipped. All lines of a list must agree on
    being labelled or not.
    """
    if not os.path.isfile(list_file):
        raise UserError(f"list file {list_file} does not exist")
    samples = []
    first_labelled = None  # (line number, labelled?) of the first entry
    with open(list_file, encoding="utf-8") as f:
        for line_number, raw_line in enumerate(f, start=1):
            line = raw_line.strip()
            if not line or line.startswith("#"):
                continue
            rel_path, label = _split_path_and_label(line)
            where = f"{list_file}:{line_number}"
            if label is not None and label < 0:
                raise UserError(f"{where}: label {label} is negative")
            if first_labelled is None:
                first_labelled = (line_number, label is not None)
            elif first_labelled[1] != (label is not None):
                raise UserError(
                    f"{where}: line is {'labelled' if label is not None else 'unlabelled'} but line "
                    f"{first_labelled[0]} is not; give every line a label or none"
                )
            path = os.path.join(root, rel_path)
            if not os.path.isfile(path):
                raise UserError(f"{where}: image {path} not found")
            samples.append((path, -1 if label is None else label))
    if not samples:
        raise UserError(f"list file {list_file} lists no images")
    return samples


def _split_path_and_label(line: str) -> tuple[str, int | None]:
    parts = line.rsplit(None, 1)
    if len(parts) == 2:
        try:
            return parts[0], int(parts[1])
        except ValueError:
            pass
    return line, None


def _build_filelist(split, args, transform):
    root = _data_path(args)
    list_file = getattr(args, f"{split}_list", None) or os.path.join(root, f"{split}.txt")
    return FileListDataset(root, list_file, transform=transform)


# --- Fashion-MNIST ----------------------------------------------------------

FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UBYTE_TYPE = 0x08


class FashionMNISTDataset(torch.utils.data.Dataset):
    """Fashion-MNIST held in memory as uint8 arrays; yields PIL 'L' images to the transform."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, source: str, transform=None):
        self.images = images
        self.targets = [int(label) for label in labels]
        self.source = source
        self.transform = transform
        self.classes = list(FASHION_MNIST_CLASSES)

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        img = Image.fromarray(self.images[index])  # 2-D uint8 -> mode 'L'
        if self.transform is not None:
            img = self.transform(img)
        return img, self.targets[index]

    def __repr__(self):
        return f"{type(self).__name__}(source={self.source}, samples={len(self)})"


def read_idx(path: str, expected_ndim: int) -> np.ndarray:
    """Parse an idx file (optionally gzipped) of unsigned bytes into a numpy array."""
    try:
        opener = gzip.open if path.endswith(".gz") else open
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as exc:  # includes gzip's BadGzipFile and truncated streams
        raise UserError(f"cannot read idx file {path}: {exc}") from None
    # Header: two zero bytes, a type code (0x08 = unsigned byte), the number of
    # dimensions, then one big-endian uint32 per dimension.
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE_TYPE or raw[3] != expected_ndim:
        magic = raw[:4].hex() or "empty"
        raise UserError(
            f"{path} is not an idx file of {expected_ndim}-D unsigned bytes (magic {magic}, "
            f"expected 000008{expected_ndim:02x})"
        )
    header_size = 4 + 4 * expected_ndim
    if len(raw) < header_size:
        raise UserError(f"idx file {path} is truncated: header incomplete")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=expected_ndim, offset=4))
    expected_size = header_size + int(np.prod(shape))
    if len(raw) != expected_size:
        raise UserError(
            f"idx file {path} is truncated or corrupt: {len(raw)} bytes, expected {expected_size} "
            f"for shape {shape}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def _find_idx_file(directory: str, name: str) -> str | None:
    for candidate in (name, name + ".gz"):
        path = os.path.join(directory, candidate)
        if os.path.isfile(path):
            return path
    return None


def _fashion_mnist_search_dirs(data_path: str | None) -> list[str]:
    dirs = []
    if data_path:
        dirs += [data_path, os.path.join(data_path, "FashionMNIST", "raw")]
    dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def _locate_fashion_mnist(split: str, data_path: str | None) -> tuple[str, str] | None:
    """First directory holding both idx files of ``split``; (images path, labels path)."""
    images_name, labels_name = FASHION_MNIST_FILES[split]
    for directory in _fashion_mnist_search_dirs(data_path):
        images_path = _find_idx_file(directory, images_name)
        labels_path = _find_idx_file(directory, labels_name)
        if images_path and labels_path:
            return images_path, labels_path
    return None


def _build_fashion_mnist(split, args, transform):
    data_path = getattr(args, "data_path", None)
    data_path = os.fspath(data_path) if data_path else None
    found = _locate_fashion_mnist(split, data_path)
    if found is None and getattr(args, "download", False):
        if not data_path:
            raise UserError("--download needs --data_path to say where Fashion-MNIST goes")
        try:
            # torchvision downloads (and md5-checks) into <data_path>/FashionMNIST/raw,
            # which is one of the places searched above.
            tv_datasets.FashionMNIST(root=data_path, train=(split == "train"), download=True)
        except (OSError, RuntimeError) as exc:
            raise UserError(f"downloading Fashion-MNIST into {data_path} failed: {exc}") from None
        found = _locate_fashion_mnist(split, data_path)
    if found is None:
        names = " and ".join(FASHION_MNIST_FILES[split])
        searched = ", ".join(_fashion_mnist_search_dirs(data_path))
        raise UserError(
            f"Fashion-MNIST {split} files ({names}, optionally .gz) not found in {searched}: "
            f"{FASHION_MNIST_INSTALL_HINT}"
        )
    images_path, labels_path = found
    images = read_idx(images_path, expected_ndim=3)
    labels = read_idx(labels_path, expected_ndim=1)
    if len(images) != len(labels):
        raise UserError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels")
    if labels.size and labels.max() >= len(FASHION_MNIST_CLASSES):
        raise UserError(f"{labels_path} has label {labels.max()}, expected 0..9")
    return FashionMNISTDataset(images, labels, source=os.path.dirname(images_path), transform=transform)
