"""Input-pipeline benchmark: decoded + augmented images/s of one loader worker, the package's pretraining
loader against the plain torchvision one.

    python benchmarks/bench_data.py
    python benchmarks/bench_data.py --images 256 --repeats 7 --json bench_data.json

The images are ImageNet-sized JPEGs made from the two photos scikit-learn ships
(``sklearn.datasets.load_sample_images``, 640 x 427): random crops of about 500 x 375 (width 440-560, 4:3),
re-encoded at ``--quality``, written as an ImageFolder. ``pip install -e .[bench]`` installs scikit-learn.

* plain: torchvision's ``ImageFolder`` loader (PIL open + ``convert("RGB")``), then ``RandomResizedCrop(224,
  scale=(0.2, 1), bicubic)``, ``RandomHorizontalFlip``, ``ToTensor``, ``Normalize``, each the torchvision class;
* package: ``util.datasets.build_dataset("train", ...)`` with ``build_transform("pretrain", ...)``, what
  main_pretrain.py's loader workers run.

One worker is one process with one torch thread (what a DataLoader worker gets), so the benchmark runs both
pipelines in this process with ``torch.set_num_threads(1)``: images/s of a full pass over the set, median of
``--repeats`` passes, the two pipelines alternating pass by pass so that load from other processes hits both
alike. The 'cpu share' column is the CPU time the process got per wall second; below 100 % other work shared
the core. Both pipelines see the same seeds, so they cut the same crops; the pixel difference between them
is reported too (in grey levels of the 0-255 input).
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: the repository root holds the modules

import torch  # noqa: E402
import torchvision  # noqa: E402
from PIL import Image  # noqa: E402
from torchvision import datasets, transforms  # noqa: E402

from benchmarks.common import cpu_model, machine, write_json  # noqa: E402
from util.datasets import (IMAGENET_MEAN, IMAGENET_STD, SMALL_IMAGE_MAX_SIZE, build_dataset,  # noqa: E402
                           build_transform)


def get_args_parser():
    p = argparse.ArgumentParser("MAE input-pipeline benchmark", description=__doc__.split("\n\n")[0])
    p.add_argument("--images", default=128, type=int, help="JPEGs to make (one pass = all of them)")
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--quality", default=90, type=int, help="JPEG quality of the re-encoded crops")
    p.add_argument("--repeats", default=5, type=int, help="timed passes per pipeline (the median is reported)")
    p.add_argument("--data_dir", default=None,
                   help="write the JPEGs here and keep them (default: a temporary directory)")
    p.add_argument("--seed", default=0, type=int)
    p.add_argument("--json", default=None, metavar="OUT.json", help="write the results here")
    return p


def make_jpegs(root: Path, count: int, quality: int, seed: int) -> Path:
    """``count`` JPEGs of about 500 x 375 cut at random from scikit-learn's sample photos, as an ImageFolder."""
    from sklearn.datasets import load_sample_images

    photos = load_sample_images().images  # two 427 x 640 RGB arrays
    rng = random.Random(seed)
    class_dir = root / "train" / "photos"
    class_dir.mkdir(parents=True, exist_ok=True)
    for k in range(count):
        photo = photos[k % len(photos)]
        width = rng.randint(440, 560)
        height = min(round(width * 3 / 4), photo.shape[0])
        x, y = rng.randint(0, photo.shape[1] - width), rng.randint(0, photo.shape[0] - height)
        Image.fromarray(photo[y:y + height, x:x + width]).save(class_dir / f"{k:05d}.jpg", quality=quality)
    return root


def plain_dataset(root: Path, input_size: int):
    bicubic = transforms.InterpolationMode.BICUBIC
    transform = transforms.Compose([
        transforms.RandomResizedCrop(input_size, scale=(0.2, 1.0), interpolation=bicubic),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    return datasets.ImageFolder(str(root / "train"), transform=transform)  # torchvision's default PIL loader


def package_dataset(root: Path, input_size: int):
    args = argparse.Namespace(dataset="imagefolder", data_path=str(root), input_size=input_size)
    return build_dataset("train", args, build_transform("pretrain", args))


def one_pass(dataset, seed: int):
    """Every image once; (wall seconds, CPU seconds)."""
    torch.manual_seed(seed)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for index in range(len(dataset)):
        dataset[index]
    return time.perf_counter() - wall0, time.process_time() - cpu0


def pixel_difference(plain, package, seed: int) -> dict:
    """Same seed per image, so the same crop and flip: how far apart are the pixels (0-255 grey levels)?"""
    std = torch.tensor(IMAGENET_STD).view(-1, 1, 1) * 255
    worst, means = 0.0, []
    for index in range(len(plain)):
        torch.manual_seed(seed + index)
        a = plain[index][0]
        torch.manual_seed(seed + index)
        b = package[index][0]
        diff = ((a - b) * std).abs()
        worst = max(worst, float(diff.max()))
        means.append(float(diff.mean()))
    return {"max_abs_grey_levels": worst, "mean_abs_grey_levels": statistics.mean(means)}


def environment() -> dict:
    return {**machine(), "device": cpu_model(), "torch": torch.__version__, "torchvision": torchvision.__version__,
            "pillow": Image.__version__}


def measure(args, root: Path) -> dict:
    torch.set_num_threads(1)  # what a DataLoader worker process gets
    pipelines = {"plain": plain_dataset(root, args.input_size), "package": package_dataset(root, args.input_size)}
    for dataset in pipelines.values():
        one_pass(dataset, args.seed)  # warm-up: file cache, allocator, lazy imports
    samples = {name: [] for name in pipelines}
    for repeat in range(args.repeats):
        order = list(pipelines) if repeat % 2 == 0 else list(pipelines)[::-1]
        for name in order:
            samples[name].append(one_pass(pipelines[name], args.seed + repeat))
    runs = {}
    for name, passes in samples.items():
        walls = [wall for wall, _ in passes]
        runs[name] = {
            "images_per_s": len(pipelines[name]) / statistics.median(walls),
            "ms_per_image": 1e3 * statistics.median(walls) / len(pipelines[name]),
            "pass_times_s": walls,
            "cpu_share": sum(cpu for _, cpu in passes) / sum(walls),
        }
    return {
        "images": len(pipelines["plain"]),
        "runs": runs,
        "speedup": runs["package"]["images_per_s"] / runs["plain"]["images_per_s"],
        # pass by pass (the two passes of a repeat ran seconds apart): robust to load that drifts
        "speedup_paired_median": statistics.median(p[0] / q[0] for p, q in zip(samples["plain"], samples["package"])),
        "pixel_difference": pixel_difference(pipelines["plain"], pipelines["package"], args.seed),
    }


def format_table(report: dict) -> str:
    a = report["args"]
    lines = [f"{report['device']}, torch {report['torch']}, torchvision {report['torchvision']}, "
             f"Pillow {report['pillow']}, {report['date']}",
             f"{report['images']} JPEGs of ~500x375 (quality {a['quality']}) -> {a['input_size']} px, one worker "
             f"(1 torch thread), median of {a['repeats']} passes",
             f"{'pipeline':<10}{'img/s':>9}{'ms/img':>9}{'cpu share':>11}"]
    for name, r in report["runs"].items():
        lines.append(f"{name:<10}{r['images_per_s']:>9.1f}{r['ms_per_image']:>9.2f}{r['cpu_share']:>11.0%}")
    d = report["pixel_difference"]
    lines.append(f"speedup per worker: {report['speedup']:.2f}x (median of per-pass ratios "
                 f"{report['speedup_paired_median']:.2f}x)")
    lines.append(f"same seeds, same crops; pixels differ by {d['mean_abs_grey_levels']:.3f} grey levels on average, "
                 f"{d['max_abs_grey_levels']:.1f} at most")
    return "\n".join(lines)


def main(args) -> dict:
    if args.input_size <= SMALL_IMAGE_MAX_SIZE:
        raise SystemExit(f"--input_size must be above {SMALL_IMAGE_MAX_SIZE}: smaller images get the small-image "
                         f"recipe (pad-crop), not RandomResizedCrop")
    report = environment()
    report["args"] = dict(vars(args))
    if args.data_dir:
        root = make_jpegs(Path(args.data_dir), args.images, args.quality, args.seed)
        report.update(measure(args, root))
    else:
        with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
            report.update(measure(args, make_jpegs(Path(tmp), args.images, args.quality, args.seed)))
    print(format_table(report))
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
