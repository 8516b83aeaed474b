"""The speed work of issue 7: the fast pretraining transform and loader (same crops, same pixels as torchvision's
recipe), --grad_ckpt in the programs, the linear probe on cached features, and the two benchmarks' command lines.

Everything runs on tiny images and models; the real figures come from benchmarks/ and live in BENCHMARKS.md.
"""
import argparse
import json
import os
import statistics

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision import transforms

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
import models_vit  # noqa: F401
from conftest import run_program, tiny_pretrain_argv
from util import datasets
from util.datasets import CropFlipNormalize, build_dataset, build_transform, read_rgb_tensor
from util.errors import UserError
from util.runtime import wrap_model

STD = torch.tensor(datasets.IMAGENET_STD).view(-1, 1, 1)


def grey_levels(a, b):
    """|a - b| of two normalised images in grey levels of the 0-255 input."""
    return ((a - b) * STD[: a.shape[0]] * 255).abs()


def pretrain_transform(input_size=96, **kwargs):
    return build_transform("pretrain", argparse.Namespace(dataset="imagefolder", input_size=input_size, **kwargs))


def ramps(height=120, width=160):
    """Red is x, green is y: a crop of it says which box was cut and whether it was flipped."""
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / (width - 1), y * 255 / (height - 1), np.full(x.shape, 128.0)], axis=-1)
    return Image.fromarray(image.round().astype(np.uint8))


def photo_like(height=120, width=160, seed=0):
    """Smooth shading, hard edges and a little noise: what a resampling filter can get wrong."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 / width, y * 255 / height, 128 + 100 * np.sin(x / 7) * np.cos(y / 5)], axis=-1)
    image[height // 3: height // 2, width // 4: width // 2] = (250, 20, 40)
    image += rng.normal(0, 6, image.shape)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


# ------------------------------------------------------------------------------------------ transform
def test_pretrain_transform_lists_torchvisions_recipe():
    transform = pretrain_transform()
    assert isinstance(transform, CropFlipNormalize)
    crop, flip, to_tensor, normalize = transform.transforms
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.scale == (0.2, 1.0) and crop.size == (96, 96)
    assert crop.interpolation == transforms.InterpolationMode.BICUBIC
    assert isinstance(flip, transforms.RandomHorizontalFlip) and isinstance(to_tensor, transforms.ToTensor)
    assert normalize.mean == datasets.IMAGENET_MEAN and normalize.std == datasets.IMAGENET_STD
    linprobe = build_transform("linprobe", argparse.Namespace(dataset="imagefolder", input_size=96))
    assert linprobe.transforms[0].scale == (0.08, 1.0)


def test_same_seed_same_crop_flip_and_random_stream_as_torchvision():
    fast = pretrain_transform()
    plain = transforms.Compose(fast.transforms)
    image = ramps()
    for seed in range(40):
        torch.manual_seed(seed)
        expected = plain(image)
        state_after_plain = torch.get_rng_state()
        torch.manual_seed(seed)
        got = fast(image)
        assert torch.equal(torch.get_rng_state(), state_after_plain), seed  # the same draws, no more, no fewer
        assert got.shape == expected.shape == (3, 96, 96) and got.dtype == torch.float32 and got.is_contiguous()
        diff = grey_levels(got, expected)  # another box or flip would be tens of grey levels off
        assert diff.mean() < 0.1 and diff.max() < 1.01, seed  # rounding: one grey level at most


def test_pixels_match_torchvision_within_a_few_grey_levels():
    fast = pretrain_transform(input_size=64)
    plain = transforms.Compose(fast.transforms)
    means = []
    for seed in range(30):
        image = photo_like(seed=seed)
        torch.manual_seed(seed)
        expected = plain(image)
        torch.manual_seed(seed)
        diff = grey_levels(fast(image), expected)
        means.append(float(diff.mean()))
        assert diff.max() <= 16, seed  # bicubic overshoot at hard edges is rounded a little differently
    assert np.mean(means) < 0.1  # almost every pixel is identical or one grey level off


def test_grayscale_and_tensor_inputs_and_the_plain_fallback():
    fast = build_transform("pretrain", argparse.Namespace(dataset="fashion_mnist", input_size=96))
    plain = transforms.Compose(fast.transforms)
    gray = photo_like().convert("L")
    torch.manual_seed(0)
    expected = plain(gray)
    torch.manual_seed(0)
    got = fast(gray)
    assert got.shape == expected.shape == (1, 96, 96)
    assert grey_levels(got, expected).mean() < 0.3
    # a uint8 (C, H, W) tensor is the same image as the PIL one
    rgb = photo_like()
    fast_rgb = pretrain_transform()
    tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)
    torch.manual_seed(1)
    from_pil = fast_rgb(rgb)
    torch.manual_seed(1)
    assert torch.equal(fast_rgb(tensor), from_pil)
    # modes without a fast path go through torchvision's steps exactly
    bilevel = gray.convert("1")
    torch.manual_seed(2)
    expected = plain(bilevel)
    torch.manual_seed(2)
    assert torch.equal(fast(bilevel), expected)


# ------------------------------------------------------------------------------------------ loader
def test_read_rgb_tensor_decodes_like_pil_and_names_broken_files(tmp_path):
    photo = photo_like()
    photo.save(tmp_path / "a.jpg", quality=90)
    photo.convert("L").save(tmp_path / "gray.png")
    photo.convert("RGBA").save(tmp_path / "alpha.png")
    jpeg = read_rgb_tensor(str(tmp_path / "a.jpg"))
    assert jpeg.dtype == torch.uint8 and jpeg.shape == (3, 120, 160)
    pil = torch.from_numpy(np.asarray(datasets.load_rgb_image(str(tmp_path / "a.jpg")))).permute(2, 0, 1)
    assert (jpeg.int() - pil.int()).abs().max() <= 1  # both are libjpeg-turbo
    assert read_rgb_tensor(str(tmp_path / "gray.png")).shape == (3, 120, 160)
    assert torch.equal(read_rgb_tensor(str(tmp_path / "alpha.png")), torch.from_numpy(np.array(photo)).permute(2, 0, 1))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes((tmp_path / "a.jpg").read_bytes()[:300])
    with pytest.raises(UserError, match=f"cannot read image {broken}"):
        read_rgb_tensor(str(broken))


def test_imagefolder_pretraining_reads_tensors_and_gives_normalised_floats(tmp_path):
    from fakedata import make_imagefolder

    data = make_imagefolder(tmp_path, per_class=2, size=80)  # PNG and JPEG
    args = argparse.Namespace(dataset="imagefolder", data_path=data, input_size=96)
    dataset = build_dataset("train", args, build_transform("pretrain", args))
    assert dataset.loader is CropFlipNormalize.image_loader
    assert isinstance(dataset.loader(dataset.samples[0][0]), torch.Tensor)
    image, label = dataset[1]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and label == 0
    # the evaluation transform still gets PIL images
    assert build_dataset("val", args).loader is datasets.load_rgb_image


# ------------------------------------------------------------------------------------------ --grad_ckpt
@pytest.mark.parametrize("program", [main_pretrain, main_finetune, main_linprobe])
def test_every_program_has_grad_ckpt(program):
    parser = program.get_args_parser()
    assert parser.parse_args([]).grad_ckpt is False
    assert parser.parse_args(["--grad_ckpt"]).grad_ckpt is True


def test_wrap_model_switches_checkpointing_on_for_both_model_families():
    args = argparse.Namespace(grad_ckpt=True, distributed=False, compile=False)
    mae = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                          decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    vit = timm.create_model("vit_tiny_patch4", img_size=16, num_classes=2)
    head = torch.nn.Linear(4, 2)
    for model in (mae, vit, head):
        assert wrap_model(model, args, torch.device("cpu")) is model
    assert mae.grad_ckpt and vit.grad_checkpointing
    off = argparse.Namespace(grad_ckpt=False, distributed=False, compile=False)
    mae2 = models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2,
                                           decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    wrap_model(mae2, off, torch.device("cpu"))
    assert not mae2.grad_ckpt


def test_pretraining_with_grad_ckpt_recomputes_the_encoder_blocks(imagefolder, tmp_path, monkeypatch):
    calls = []
    real = models_mae.checkpoint

    def counting(fn, *args, **kwargs):
        calls.append(1)
        return real(fn, *args, **kwargs)

    monkeypatch.setattr(models_mae, "checkpoint", counting)
    args = main_pretrain.get_args_parser().parse_args(
        tiny_pretrain_argv(imagefolder, tmp_path, "--epochs", "1", "--grad_ckpt", "--vis_freq", "0"))
    main_pretrain.main(args)
    assert len(calls) == 2 * 12  # 16 images, batch 8: two steps through the 12 encoder blocks
    assert json.loads((tmp_path / "log.txt").read_text().splitlines()[-1])["train_loss"] > 0


# ------------------------------------------------------------------------------------------ --cache_features
def test_merge_shards_restores_dataset_order():
    length, world = 7, 3
    sampler_shards = [list(torch.utils.data.DistributedSampler(range(length), world, r, shuffle=False))
                      for r in range(world)]
    parts = [torch.tensor(shard) for shard in sampler_shards]
    assert main_linprobe.merge_shards(parts, length).tolist() == list(range(length))


def test_cached_features_are_exactly_what_the_head_sees(tmp_path):
    from fakedata import make_imagefolder

    data = make_imagefolder(tmp_path, per_class=3, size=32)
    args = main_linprobe.get_args_parser().parse_args(
        ["--data_path", data, "--input_size", "32", "--batch_size", "4", "--num_workers", "0", "--device", "cpu", "--amp", "none"])
    args.amp = "none"
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch4", img_size=32, num_classes=2, global_pool=True).eval()
    dataset = build_dataset("val", args)
    features, labels = main_linprobe.extract_features(model, dataset, args, torch.device("cpu"))
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    assert features.shape == (6, 192) and labels.tolist() == [0, 0, 0, 1, 1, 1]
    with torch.no_grad():
        assert torch.allclose(model.head(features), model(images), atol=1e-5)


def test_linprobe_with_cache_features_trains_the_head_on_the_cache(imagefolder, tmp_path, capsys):
    out = tmp_path / "lp"
    argv = ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(imagefolder), "--nb_classes", "2",
            "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0", "--blr", "1.0",
            "--warmup_epochs", "0", "--output_dir", str(out), "--log_dir", "", "--cache_features"]
    main_linprobe.main(main_linprobe.get_args_parser().parse_args(argv))
    stdout = capsys.readouterr().out
    assert "cached the features of 16 training and 16 validation images (192 per image)" in stdout
    assert stdout.count(" took ") == 2
    lines = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1] and "test_acc1" in lines[-1]
    state = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert "blocks.0.attn.qkv.weight" in state  # the whole model is saved, as by the standard probe
    assert state["head.0.running_mean"].abs().sum() > 0  # the BatchNorm saw the cached features
    assert state["head.0.num_batches_tracked"] == 2 * 2  # in training mode, at every step: 2 epochs of 16 / 8


# ------------------------------------------------------------------------------------------ benchmarks
def test_bench_data_command_line(tmp_path):
    pytest.importorskip("sklearn", reason="benchmarks need the 'bench' extra (scikit-learn)")
    out = tmp_path / "data.json"
    result = run_program("benchmarks/bench_data.py", "--images", "6", "--repeats", "2", "--input_size", "96",
                         "--json", out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    runs = report["runs"]
    assert report["images"] == 6 and set(runs) == {"plain", "package"}
    for run in runs.values():
        assert len(run["pass_times_s"]) == 2
        assert run["images_per_s"] == pytest.approx(6 / statistics.median(run["pass_times_s"]))
        assert run["ms_per_image"] == pytest.approx(1e3 / run["images_per_s"])
        assert 0 < run["cpu_share"] <= 1.5  # one thread: at most about one CPU second per wall second
    assert report["speedup"] == pytest.approx(runs["package"]["images_per_s"] / runs["plain"]["images_per_s"])
    paired = [p / q for p, q in zip(runs["plain"]["pass_times_s"], runs["package"]["pass_times_s"])]
    assert report["speedup_paired_median"] == pytest.approx(statistics.median(paired))
    assert report["pixel_difference"]["mean_abs_grey_levels"] < 0.5
    assert f"speedup per worker: {report['speedup']:.2f}x" in result.stdout


def test_bench_linprobe_command_line(tmp_path):
    from fakedata import make_fashion_mnist

    data = make_fashion_mnist(tmp_path)  # 32 training, 16 test images
    out = tmp_path / "lp.json"
    runs = tmp_path / "runs"
    result = run_program("benchmarks/bench_linprobe.py", "--data_path", data, "--pretrain_images", "32",
                         "--pretrain_epochs", "1", "--probe_images", "32", "--epochs", "3", "--batch_size", "8",
                         "--num_workers", "0", "--output_dir", runs, "--json", out, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["checkpoint"] == str(runs / "pretrain" / "checkpoint-last.pth")
    assert os.path.isfile(report["checkpoint"])
    assert "main_pretrain.py" in report["pretrain_command"]
    for name in ("standard", "cached", "unaugmented"):
        run = report[name]
        assert len(run["epoch_times_s"]) == 3 and run["epoch_time_s"] == statistics.median(run["epoch_times_s"])
        last = json.loads((runs / name / "log.txt").read_text().splitlines()[-1])
        assert last["epoch"] == 2 and run["top1"] == last["test_acc1"]  # the last epoch's, not the best
        assert (run["top1"] * 16 / 100).is_integer()  # a share of the 16 test images
    standard, cached = report["standard"], report["cached"]
    # the encoder runs on every image every epoch in the standard probe, once before training in the cached one
    assert cached["epoch_time_s"] < standard["epoch_time_s"]
    assert report["speedup_per_epoch"] == pytest.approx(standard["epoch_time_s"] / cached["epoch_time_s"])
    assert cached["feature_extraction_s"] >= 0 and standard["feature_extraction_s"] is None
    assert report["break_even_epochs"] == pytest.approx(
        cached["feature_extraction_s"] / (standard["epoch_time_s"] - cached["epoch_time_s"]))
    assert report["top1_difference"] == cached["top1"] - standard["top1"]
    # the same images, seed and head: the cache reproduces the standard probe without augmentation
    assert report["top1_difference_unaugmented"] == 0
    assert "--no_train_augmentation" in report["unaugmented"]["command"]
    assert "--cache_features" in cached["command"] and "--cache_features" not in standard["command"]
    assert f"per-epoch speedup {report['speedup_per_epoch']:.1f}x" in result.stdout


def test_bench_ablations_command_line(tmp_path):
    # the script checks that its 'package' masking and unshuffle are what models_mae does, or exits with an error
    out = tmp_path / "ablations.json"
    result = run_program("benchmarks/bench_ablations.py", "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                         "--batch_size", "2", "--reps", "2", "--json", out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [r["piece"].split(":")[0] for r in rows] == [
        "masking gather", "decoder unshuffle", "encoder attention", "decoder attention", "AdamW", "AdamW"]
    assert all(r["package_ms"] > 0 and r["other_ms"] > 0 for r in rows)
    assert [r["per_step"] for r in rows] == [1, 1, 12, 4, 1, 1]  # attention once per encoder / decoder block
    assert [(r["package"], r["other"]) for r in rows[4:]] == [("fused", "foreach"), ("fused", "for-loop")]
    assert rows[4]["package_ms"] == rows[5]["package_ms"]  # one measurement of the fused AdamW, two comparisons
    assert "decoder unshuffle: concat+gather+concat vs one gather" in result.stdout


def test_cached_probe_reproduces_the_standard_probe_without_augmentation(imagefolder, tmp_path):
    """Same images (the evaluation transform), same order, same head: only where the features come from differs."""
    logs = {}
    for name, flag in (("standard", "--no_train_augmentation"), ("cached", "--cache_features")):
        out = tmp_path / name
        argv = ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(imagefolder),
                "--nb_classes", "2", "--epochs", "3", "--batch_size", "4", "--device", "cpu", "--amp", "none", "--num_workers", "0",
                "--blr", "5.0", "--warmup_epochs", "0", "--seed", "3", "--output_dir", str(out), "--log_dir", "",
                flag]
        main_linprobe.main(main_linprobe.get_args_parser().parse_args(argv))
        logs[name] = [json.loads(line) for line in (out / "log.txt").read_text().splitlines()]
    for standard, cached in zip(logs["standard"], logs["cached"]):
        assert cached["train_loss"] == pytest.approx(standard["train_loss"], abs=1e-5)
        assert cached["test_loss"] == pytest.approx(standard["test_loss"], abs=1e-5)
        assert cached["test_acc1"] == standard["test_acc1"]
    assert logs["standard"][0]["train_loss"] != logs["standard"][-1]["train_loss"]  # the head did learn
