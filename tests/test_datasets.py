"""util/datasets.py: every format loads with every transform kind, and every data error names its file."""

import argparse
import gzip
import math
import os
import random
import re

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from tests import fakedata
from util import datasets
from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError
from util.loader import build_classification_loaders

KINDS = ("pretrain", "finetune", "linprobe", "eval")


def make_args(**overrides):
    values = dict(
        dataset="imagefolder", data_path=None, input_size=32, download=False,
        color_jitter=0.4, aa="rand-m9-mstd0.5-inc1", reprob=0.25, remode="pixel", recount=1,
    )
    values.update(overrides)
    return argparse.Namespace(**values)


def check_samples(dataset, channels, size, count=3):
    assert len(dataset) > 0
    for index in range(min(count, len(dataset))):
        image, label = dataset[index]
        assert isinstance(image, torch.Tensor)
        assert image.shape == (channels, size, size)
        assert image.dtype == torch.float32
        assert isinstance(label, int)


@pytest.fixture
def no_debian_fashion_mnist(monkeypatch, tmp_path):
    """Hide the system-wide Fashion-MNIST so the search only sees the test's own files."""
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "no-debian-here"))


# --- loading every format with every transform ------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_imagefolder_small_images(tmp_path, kind):
    args = make_args(data_path=fakedata.make_imagefolder(tmp_path, num_classes=3, per_class=2))
    for split in ("train", "val"):
        dataset = build_dataset(split, args, build_transform(kind, args))
        assert len(dataset) == 6
        assert sorted(set(dataset.targets)) == [0, 1, 2]
        check_samples(dataset, 3, 32)


@pytest.mark.parametrize("kind", KINDS)
def test_imagefolder_large_images(tmp_path, kind):
    args = make_args(data_path=fakedata.make_imagefolder(tmp_path, per_class=1, size=80), input_size=96)
    check_samples(build_dataset("train", args, build_transform(kind, args)), 3, 96)


@pytest.mark.parametrize("which, num_classes", [("cifar10", 10), ("cifar100", 100)])
@pytest.mark.parametrize("kind", KINDS)
def test_cifar(tmp_path, monkeypatch, which, num_classes, kind):
    fakedata.accept_fake_cifar(monkeypatch)
    args = make_args(dataset=which, data_path=fakedata.make_cifar(tmp_path, which, n_train=12, n_test=5))
    assert dataset_info(args).num_classes == num_classes
    train = build_dataset("train", args, build_transform(kind, args))
    val = build_dataset("val", args, build_transform(kind, args))
    assert (len(train), len(val)) == (12, 5)
    check_samples(train, 3, 32)
    check_samples(val, 3, 32)


def test_cifar_pixels_survive_the_round_trip(tmp_path, monkeypatch):
    """The fake files use torchvision's planar byte order: the image we generated is the one we get back."""
    fakedata.accept_fake_cifar(monkeypatch)
    args = make_args(dataset="cifar10", data_path=fakedata.make_cifar(tmp_path, n_train=5, n_test=2))
    image, label = build_dataset("train", args, transform=lambda img: img)[3]
    assert label == 3
    pixels = np.asarray(image)
    stripe = slice(3 * 32 // 10, 4 * 32 // 10)
    assert pixels[stripe].mean() > pixels.mean() + 50  # class 3's (horizontal) stripe is the bright one


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_filelist(tmp_path, kind, labelled):
    args = make_args(dataset="filelist", data_path=fakedata.make_filelist(tmp_path, n=6, labelled=labelled))
    dataset = build_dataset("train", args, build_transform(kind, args))
    assert len(dataset) == 6
    assert dataset.targets == ([0, 1, 0, 1, 0, 1] if labelled else [-1] * 6)
    assert any(" " in path for path in dataset.items)  # paths with spaces were parsed
    check_samples(dataset, 3, 32)


def test_filelist_explicit_list_files(tmp_path):
    data_path = fakedata.make_filelist(tmp_path, n=4)
    custom_list = tmp_path / "mine.txt"
    custom_list.write_text("images/val/img_1.png 7\n")
    args = make_args(dataset="filelist", data_path=data_path, val_list=str(custom_list))
    dataset = build_dataset("val", args)
    assert dataset.targets == [7]
    assert len(dataset.classes) == 8


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_fashion_mnist(tmp_path, no_debian_fashion_mnist, kind, gz):
    args = make_args(dataset="fashion_mnist", data_path=fakedata.make_fashion_mnist(tmp_path, gz=gz), input_size=28)
    train = build_dataset("train", args, build_transform(kind, args))
    val = build_dataset("val", args, build_transform(kind, args))
    assert (len(train), len(val)) == (32, 16)
    assert train.targets[:12] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    check_samples(train, 1, 28)
    check_samples(val, 1, 28)


@pytest.mark.parametrize("input_size", [32, 96])
@pytest.mark.parametrize("kind", KINDS)
def test_fashion_mnist_resized(tmp_path, no_debian_fashion_mnist, kind, input_size):
    """28-px grayscale images through the upsampling small path and through timm's large-image recipe."""
    args = make_args(dataset="fashion_mnist", data_path=fakedata.make_fashion_mnist(tmp_path), input_size=input_size)
    check_samples(build_dataset("train", args, build_transform(kind, args)), 1, input_size, count=8)


@pytest.mark.parametrize("input_size", [28, 96])
def test_fashion_mnist_finetune_color_jitter_without_randaugment(tmp_path, no_debian_fashion_mnist, input_size):
    args = make_args(dataset="fashion_mnist", data_path=fakedata.make_fashion_mnist(tmp_path),
                     input_size=input_size, aa="none", color_jitter=0.4)
    transform = build_transform("finetune", args)
    assert "ColorJitter" in repr(transform) and "RandAugment" not in repr(transform)
    check_samples(build_dataset("train", args, transform), 1, input_size)


def test_fashion_mnist_finds_torchvision_layout(tmp_path, no_debian_fashion_mnist):
    raw_dir = tmp_path / "FashionMNIST" / "raw"
    raw_dir.mkdir(parents=True)
    for name in os.listdir(fakedata.make_fashion_mnist(tmp_path / "src", gz=True)):
        os.rename(tmp_path / "src" / "fashion_mnist" / name, raw_dir / name)
    dataset = build_dataset("val", make_args(dataset="fashion_mnist", data_path=str(tmp_path), input_size=28))
    assert len(dataset) == 16
    assert dataset.source == str(raw_dir)


def test_fashion_mnist_download_goes_through_torchvision(tmp_path, monkeypatch, no_debian_fashion_mnist):
    """--download asks torchvision to fetch into <data_path>/FashionMNIST/raw, then reads from there."""
    calls = []

    def fake_torchvision_fashion_mnist(root, train, download):
        calls.append((root, train, download))
        generated = fakedata.make_fashion_mnist(tmp_path / "generated")
        os.makedirs(os.path.join(root, "FashionMNIST"), exist_ok=True)
        os.rename(generated, os.path.join(root, "FashionMNIST", "raw"))

    monkeypatch.setattr(datasets.tv_datasets, "FashionMNIST", fake_torchvision_fashion_mnist)
    data_path = str(tmp_path / "data")
    args = make_args(dataset="fashion_mnist", data_path=data_path, input_size=28, download=True)
    dataset = build_dataset("train", args)
    assert calls == [(data_path, True, True)]
    assert len(dataset) == 32


@pytest.mark.skipif(not os.path.isdir(datasets.DEBIAN_FASHION_MNIST_DIR),
                    reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path):
    args = make_args(dataset="fashion_mnist", data_path=str(tmp_path), input_size=28)
    dataset = build_dataset("val", args)  # the 10,000-image test split is the quicker one to read
    assert dataset.source == datasets.DEBIAN_FASHION_MNIST_DIR
    assert len(dataset) == 10000
    assert sorted(set(dataset.targets)) == list(range(10))
    check_samples(dataset, 1, 28)


def test_dataset_info():
    assert dataset_info(make_args(dataset="fashion_mnist")) == datasets.DataInfo((0.2860,), (0.3530,), 1, 10)
    rgb = dataset_info(make_args(dataset="cifar100"))
    assert (rgb.mean, rgb.std, rgb.in_chans, rgb.num_classes) == (
        (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), 3, 100)
    assert dataset_info(make_args(dataset="imagefolder")).num_classes is None
    assert dataset_info(argparse.Namespace()).in_chans == 3  # minimal Namespace: imagefolder defaults
    with pytest.raises(UserError, match="unknown dataset 'mnist'"):
        dataset_info(make_args(dataset="mnist"))


# --- transforms ---------------------------------------------------------------

def test_small_pretrain_transform_keeps_32px_and_does_not_resize():
    transform = build_transform("pretrain", make_args(input_size=32))
    step_types = [type(step).__name__ for step in transform.transforms]
    assert "RandomResizedCrop" not in step_types
    assert "RandomCrop" in step_types
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert transform(image).shape == (3, 32, 32)
    # The resize step leaves native-size images untouched (same object back).
    assert transform.transforms[0](image) is image


def test_small_eval_transform_is_deterministic_and_uncropped():
    transform = build_transform("eval", make_args(input_size=32))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    expected = (torch.from_numpy(np.array(image)).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(transform(image), expected, atol=1e-6)


def test_small_transform_makes_non_square_images_square():
    transform = build_transform("eval", make_args(input_size=32))
    assert transform(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


def test_large_eval_transform_resizes_and_center_crops_to_224():
    transform = build_transform("eval", make_args(input_size=224))
    resize = transform.transforms[0]
    assert resize.size == 256  # int(224 / 0.875), the original MAE evaluation resize
    assert transform(Image.new("RGB", (300, 250))).shape == (3, 224, 224)


@pytest.mark.parametrize("input_size, resize", [(96, 109), (224, 256), (384, 384), (448, 448)])
def test_large_eval_transform_crop_pct_follows_the_original(input_size, resize):
    """crop_pct 224/256 up to 224 px, 1.0 above: at 448 px the image is resized to 448, not 512."""
    transform = build_transform("eval", make_args(input_size=input_size))
    assert transform.transforms[0].size == resize
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (500, 600, 3), dtype=np.uint8))
    bicubic = transforms.InterpolationMode.BICUBIC
    by_hand = transforms.Compose([
        transforms.Resize(resize, interpolation=bicubic), transforms.CenterCrop(input_size), transforms.ToTensor(),
        transforms.Normalize(datasets.IMAGENET_MEAN, datasets.IMAGENET_STD)])
    assert torch.equal(transform(image), by_hand(image))


def test_large_pretrain_transform_uses_mae_crop_scale():
    transform = build_transform("pretrain", make_args(input_size=224))
    crop = transform.transforms[0]
    assert type(crop).__name__ == "RandomResizedCrop" and crop.scale == (0.2, 1.0)
    assert transform(Image.new("RGB", (300, 250))).shape == (3, 224, 224)


def original_linprobe_crop_box(height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """The original linear probe's crop, written from its definition: one draw, clamped, uniform offsets."""
    area = torch.empty(1).uniform_(*scale).item() * height * width
    aspect = math.exp(torch.empty(1).uniform_(math.log(ratio[0]), math.log(ratio[1])).item())
    w = min(round(math.sqrt(area * aspect)), width)
    h = min(round(math.sqrt(area / aspect)), height)
    return torch.randint(0, height - h + 1, (1,)).item(), torch.randint(0, width - w + 1, (1,)).item(), h, w


def linprobe_crop_boxes(draw, image, draws=4000, seed=0):
    torch.manual_seed(seed)
    return [draw(image) for _ in range(draws)]


def test_linprobe_crop_is_the_originals_single_draw_crop():
    """torchvision's retries and center-crop fallback would give 0.43 of a 500 x 375 image on average."""
    crop = build_transform("linprobe", make_args(input_size=224)).transforms[0]
    assert crop.scale == (0.08, 1.0) and crop.interpolation == transforms.InterpolationMode.BICUBIC
    image = Image.new("RGB", (500, 375))
    ours = linprobe_crop_boxes(lambda img: crop.get_params(img, crop.scale, crop.ratio), image)
    reference = linprobe_crop_boxes(lambda img: original_linprobe_crop_box(375, 500), image, seed=1)
    for top, left, h, w in ours:
        assert 0 <= top and top + h <= 375 and 0 <= left and left + w <= 500 and h > 0 and w > 0
    stats = {}
    for name, boxes in (("ours", ours), ("reference", reference)):
        fractions = np.array([h * w / (375 * 500) for _, _, h, w in boxes])
        stats[name] = (fractions.mean(), (fractions > 0.7).mean())
    assert stats["ours"][0] == pytest.approx(0.52, abs=0.02)
    assert stats["ours"][1] == pytest.approx(0.29, abs=0.03)
    assert stats["ours"][0] == pytest.approx(stats["reference"][0], abs=0.02)
    assert stats["ours"][1] == pytest.approx(stats["reference"][1], abs=0.03)


def test_linprobe_crop_never_exceeds_the_image():
    crop = build_transform("linprobe", make_args(input_size=96)).transforms[0]
    torch.manual_seed(0)
    for width, height in ((500, 375), (40, 300), (300, 40), (7, 5), (1, 1)):
        image = torch.zeros(3, height, width, dtype=torch.uint8)
        for _ in range(300):
            top, left, h, w = crop.get_params(image, crop.scale, crop.ratio)
            assert 0 <= top <= top + h <= height and 0 <= left <= left + w <= width and h >= 1 and w >= 1


def test_linprobe_fast_and_plain_paths_cut_the_same_box():
    fast = build_transform("linprobe", make_args(input_size=96))
    plain = transforms.Compose(fast.transforms)
    crop = fast.transforms[0]
    image = ramps()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
    std = torch.tensor(datasets.IMAGENET_STD).view(-1, 1, 1)
    for seed in range(30):
        torch.manual_seed(seed)
        box_pil = crop.get_params(image, crop.scale, crop.ratio)
        torch.manual_seed(seed)
        assert crop.get_params(pixels, crop.scale, crop.ratio) == box_pil, seed
        torch.manual_seed(seed)
        expected = plain(image)
        state_after_plain = torch.get_rng_state()
        for fast_input in (image, pixels):
            torch.manual_seed(seed)
            got = fast(fast_input)
            assert torch.equal(torch.get_rng_state(), state_after_plain), seed
            diff = ((got - expected) * std * 255).abs()  # another box or flip would be tens of grey levels off
            assert diff.mean() < 0.1 and diff.max() < 1.01, seed


def ramps(height=120, width=160):
    """Red is x, green is y: a crop of it says which box was cut and whether it was flipped."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full(x.shape, 128.0)], axis=-1)
    return Image.fromarray(image.round().astype(np.uint8))


def test_small_finetune_transform_randaugment_and_erasing_switches():
    with_aug = build_transform("finetune", make_args(input_size=32))
    names = [type(step).__name__ for step in with_aug.transforms]
    assert "RandAugment" in names and names[-1] == "RandomErasing"
    plain = build_transform("finetune", make_args(input_size=32, aa="none", reprob=0.0, color_jitter=None))
    names = [type(step).__name__ for step in plain.transforms]
    assert "RandAugment" not in names and "RandomErasing" not in names


def test_grayscale_randaugment_every_op_keeps_one_channel():
    """RandAugment's fill colour comes from the dataset mean, one value for 'L' images."""
    args = make_args(dataset="fashion_mnist", input_size=28, aa="rand-m10-n4-mstd0.5-inc1", reprob=0.5)
    transform = build_transform("finetune", args)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), dtype=np.uint8))
    random.seed(0)  # timm's RandAugment draws from Python's random
    for _ in range(60):  # enough draws to hit the rotate/shear/translate ops that need a fill colour
        assert transform(image).shape == (1, 28, 28)


def test_unknown_transform_kind_or_split():
    with pytest.raises(ValueError, match="transform kind"):
        build_transform("test", make_args())
    with pytest.raises(ValueError, match="split"):
        build_dataset("test", make_args(data_path="/nonexistent"))


# --- errors name the culprit -------------------------------------------------

def test_missing_split_dir_names_directory(tmp_path):
    data_path = fakedata.make_imagefolder(tmp_path, per_class=1, splits=("train",))
    with pytest.raises(UserError, match=re.escape(f"no images found in {os.path.join(data_path, 'val')}")):
        build_dataset("val", make_args(data_path=data_path))


@pytest.mark.parametrize("layout", ["empty", "empty class folder"])
def test_empty_split_dir_names_directory(tmp_path, layout):
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    if layout == "empty class folder":
        (train_dir / "cat").mkdir()
    with pytest.raises(UserError, match=re.escape(f"no images found in {train_dir}: expected class sub-folders")):
        build_dataset("train", make_args(data_path=str(tmp_path)))


def test_corrupt_image_names_file(tmp_path):
    data_path = fakedata.make_imagefolder(tmp_path, per_class=1)
    broken = os.path.join(data_path, "train", "class_00", "img_000.png")
    with open(broken, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n this is no longer an image")
    dataset = build_dataset("train", make_args(data_path=data_path))
    with pytest.raises(UserError, match=re.escape(f"cannot read image {broken}")):
        dataset[0]


def test_corrupt_image_in_filelist_names_file(tmp_path):
    data_path = fakedata.make_filelist(tmp_path, n=2)
    broken = os.path.join(data_path, "images", "train", "img_1.png")
    with open(broken, "wb") as f:
        f.write(b"")
    dataset = build_dataset("train", make_args(dataset="filelist", data_path=data_path))
    with pytest.raises(UserError, match=re.escape(f"cannot read image {broken}")):
        dataset[1]


def test_filelist_missing_entry_names_list_line_and_path(tmp_path):
    data_path = fakedata.make_filelist(tmp_path, n=2)
    list_file = os.path.join(data_path, "train.txt")
    with open(list_file, "a") as f:
        f.write("images/train/ghost picture.png 1\n")
    line_number = len(open(list_file).read().splitlines())
    expected = f"{list_file}:{line_number}: image {os.path.join(data_path, 'images/train/ghost picture.png')} not found"
    with pytest.raises(UserError) as error:
        build_dataset("train", make_args(dataset="filelist", data_path=data_path))
    assert str(error.value) == expected


def test_filelist_missing_list_file_and_mixed_labels(tmp_path):
    data_path = fakedata.make_filelist(tmp_path, n=2)
    with pytest.raises(UserError, match="list file .*nope.txt does not exist"):
        missing_list = str(tmp_path / "nope.txt")
        build_dataset("train", make_args(dataset="filelist", data_path=data_path, train_list=missing_list))
    mixed = tmp_path / "mixed.txt"
    mixed.write_text("images/train/img_1.png 1\nimages/train/class 0/img 0.png\n")
    with pytest.raises(UserError, match="mixed.txt:2: line is unlabelled but line 1 is not"):
        build_dataset("train", make_args(dataset="filelist", data_path=data_path, train_list=str(mixed)))


def test_fashion_mnist_missing_gives_install_hint(tmp_path, no_debian_fashion_mnist):
    with pytest.raises(UserError) as error:
        build_dataset("train", make_args(dataset="fashion_mnist", data_path=str(tmp_path), input_size=28))
    message = str(error.value)
    assert "train-images-idx3-ubyte" in message and str(tmp_path) in message
    assert "apt-get install dataset-fashion-mnist, or pass --download on a machine with internet" in message


@pytest.mark.parametrize("damage", ["truncated", "bad magic", "truncated gzip"])
def test_fashion_mnist_bad_idx_names_file(tmp_path, no_debian_fashion_mnist, damage):
    gz = damage == "truncated gzip"
    data_path = fakedata.make_fashion_mnist(tmp_path, gz=gz)
    victim = os.path.join(data_path, "t10k-images-idx3-ubyte" + (".gz" if gz else ""))
    content = open(victim, "rb").read()
    if damage == "bad magic":
        content = b"\x00\x00\x09\x03" + content[4:]
    else:
        content = content[: len(content) // 2]
    with open(victim, "wb") as f:
        f.write(content)
    with pytest.raises(UserError, match=re.escape(victim)):
        build_dataset("val", make_args(dataset="fashion_mnist", data_path=data_path, input_size=28))


def test_fashion_mnist_image_label_count_mismatch(tmp_path, no_debian_fashion_mnist):
    data_path = fakedata.make_fashion_mnist(tmp_path)
    fakedata.write_idx(os.path.join(data_path, "t10k-labels-idx1-ubyte"), np.zeros(3, dtype=np.uint8))
    with pytest.raises(UserError, match="has 16 images but .*t10k-labels-idx1-ubyte has 3 labels"):
        build_dataset("val", make_args(dataset="fashion_mnist", data_path=data_path, input_size=28))


def test_cifar_missing_without_download_says_pass_download(tmp_path):
    expected_dir = tmp_path / "cifar-10-batches-py"
    with pytest.raises(UserError, match=re.escape(f"expected torchvision's files in {expected_dir}") + ".*--download"):
        build_dataset("train", make_args(dataset="cifar10", data_path=str(tmp_path)))


def test_cifar_files_failing_md5_are_reported_as_corrupted(tmp_path):
    """Without the test-only md5 bypass, generated files are exactly what a corrupted download looks like."""
    data_path = fakedata.make_cifar(tmp_path, "cifar100", n_train=2, n_test=2)
    with pytest.raises(UserError, match="cifar-100-python are missing or corrupted"):
        build_dataset("train", make_args(dataset="cifar100", data_path=data_path))


def test_idx_reader_round_trip(tmp_path):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("x-idx3-ubyte", "x-idx3-ubyte.gz"):
        fakedata.write_idx(tmp_path / name, array)
        assert np.array_equal(datasets.read_idx(str(tmp_path / name), expected_ndim=3), array)
    with gzip.open(tmp_path / "x-idx3-ubyte.gz", "rb") as f:
        assert f.read(4) == b"\x00\x00\x08\x03"
    with pytest.raises(UserError, match="not an idx file of 1-D"):
        datasets.read_idx(str(tmp_path / "x-idx3-ubyte"), expected_ndim=1)


@pytest.mark.parametrize("input_size", [32, 224])
def test_randaugment_survives_zero_bit_posterize(input_size):
    """Magnitude 10 makes timm ask for 0-bit posterize, which Pillow 13 rejects; we give the black image."""
    transform = build_transform("finetune", make_args(input_size=input_size, aa="rand-n1-m10-inc1", reprob=0))
    randaugment = next(step for step in transform.transforms if type(step).__name__ == "RandAugment")
    posterize = next(op for op in randaugment.ops if op.name == "PosterizeIncreasing")
    posterize.prob = 1.0
    image = Image.new("RGB", (input_size, input_size), (200, 150, 100))
    assert np.asarray(posterize(image)).max() == 0
    randaugment.ops = [posterize]
    assert transform(image).shape == (3, input_size, input_size)


def test_small_finetune_accepts_autoaugment_and_augmix_policies():
    image = Image.new("L", (28, 28), 90)
    for policy in ("original", "augmix-m5-w2-d2"):
        transform = build_transform("finetune", make_args(dataset="fashion_mnist", input_size=28, aa=policy))
        assert transform(image).shape == (1, 28, 28)


def test_classification_loaders_return_the_class_count_and_leave_args_alone(tmp_path):
    data_path = fakedata.make_imagefolder(tmp_path, num_classes=3, per_class=2)
    args = make_args(data_path=data_path, nb_classes=None, batch_size=2, num_workers=0, pin_mem=False,
                     dist_eval=False, seed=0, max_train_images=0)
    loader_train, loader_val, nb_classes = build_classification_loaders(args, "finetune")
    assert nb_classes == 3 and args.nb_classes is None
    assert len(loader_train.dataset) == len(loader_val.dataset) == 6
    args.nb_classes = 5
    assert build_classification_loaders(args, "linprobe")[2] == 5
    args.nb_classes = 2
    with pytest.raises(UserError, match="--nb_classes 2 is smaller than the 3 classes"):
        build_classification_loaders(args, "linprobe")
    unlabelled = make_args(dataset="filelist", data_path=fakedata.make_filelist(tmp_path / "f", n=4, labelled=False),
                           nb_classes=None, batch_size=2, num_workers=0, pin_mem=False, dist_eval=False, seed=0)
    with pytest.raises(UserError, match="cannot tell the number of classes"):
        build_classification_loaders(unlabelled, "finetune")


def test_small_image_crop_padding_zero_leaves_only_flips():
    """--crop_padding 0: a fine-tuning sample is the evaluation image or its mirror image, never shifted; by default
    (size / 8 px) some samples are shifted. Above 64 px the flag is refused, not ignored."""
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8))
    plain = dict(dataset="fashion_mnist", input_size=28, aa="none", color_jitter=None, reprob=0.0)
    reference = build_transform("eval", make_args(**plain))(image)
    mirrored = torch.flip(reference, dims=[-1])

    def shifted_samples(**extra):
        transform = build_transform("finetune", make_args(**plain, **extra))
        torch.manual_seed(0)
        samples = [transform(image) for _ in range(20)]
        return sum(not (torch.equal(s, reference) or torch.equal(s, mirrored)) for s in samples)

    assert shifted_samples(crop_padding=0) == 0
    assert shifted_samples() > 10
    with pytest.raises(UserError, match="--crop_padding applies to images up to 64 px, not --input_size 96"):
        build_transform("finetune", make_args(**{**plain, "input_size": 96}, crop_padding=0))
