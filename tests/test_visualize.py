"""Reconstruction figures, the pretraining logger, the loss curve and visualize.py, on tiny models.

Expected pictures are computed here from the model's own outputs (``model(imgs, ratio, noise)``,
``model.unpatchify``) and the known mean/std, not with util.figures' helpers."""
import argparse
import io
import json
import os

import matplotlib
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models_mae
import visualize
from conftest import run_program
from fakedata import make_imagefolder
from util.cli import run
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, build_dataset
from util.errors import UserError
from util.figures import PAD, ReconstructionLogger, draw, fixed_noise, plot_loss_curve, read_log, run_model
from util.runtime import build_model
from util.targets import HOGTarget

GREY_MEAN, GREY_STD = (0.3,), (0.4,)
SCALE = 6  # 16-px test images are enlarged 6 times to reach 96 px


def tiny_mae(in_chans=3, norm_pix_loss=False, img_size=16):
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(img_size=img_size, patch_size=4, in_chans=in_chans, embed_dim=32, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           norm_pix_loss=norm_pix_loss)


def hog_mae(in_chans=3):
    model, target = tiny_mae(in_chans=in_chans), HOGTarget(4, in_chans, 2)
    model.set_target(target)
    return model, target


def normalised_images(n=3, channels=3, size=16, seed=1):
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def by_hand_display(x, mean, std):
    """De-normalise (N, C, H, W) with the dataset statistics, written out per channel, and clamp to [0, 1]."""
    out = torch.empty_like(x)
    for c in range(x.shape[1]):
        out[:, c] = x[:, c] * std[c] + mean[c]
    return out.clamp(0, 1)


def by_hand_pixel_mask(mask, grid=4, patch=4):
    """(N, L) patch mask -> (N, H, W) bool: patch k covers rows patch*(k // grid), columns patch*(k % grid)."""
    out = torch.zeros(mask.shape[0], grid * patch, grid * patch, dtype=torch.bool)
    for n in range(mask.shape[0]):
        for k in range(mask.shape[1]):
            r, c = patch * (k // grid), patch * (k % grid)
            out[n, r:r + patch, c:c + patch] = bool(mask[n, k])
    return out


def model_outputs(model, imgs, noise, ratio=0.75):
    model.eval()
    with torch.no_grad():
        return model(imgs, mask_ratio=ratio, noise=noise)


def cell(grid, row, column, size=16, scale=SCALE):
    """The (C, size, size) image of one cell of a grid, back at its source resolution."""
    step = size * scale + PAD
    top, left = PAD + row * step, PAD + column * step
    block = grid[:, top:top + size * scale, left:left + size * scale]
    # nearest-neighbour enlargement: every block of scale x scale pixels is one source pixel
    assert torch.equal(block, block[:, ::scale, ::scale].repeat_interleave(scale, 1).repeat_interleave(scale, 2))
    return block[:, ::scale, ::scale]


def find_in_png(png, grid):
    """Where the grid's interior (inside its outer padding) sits in the PNG, pixel for pixel (within 1/255)."""
    inner = (grid.permute(1, 2, 0).numpy() * 255)[PAD:-PAD, PAD:-PAD]
    probe = inner[:16, :16]
    height, width = inner.shape[:2]
    for y in range(png.shape[0] - height + 1):
        for x in range(png.shape[1] - width + 1):
            if np.abs(png[y:y + 16, x:x + 16] - probe).max() <= 1 and \
                    np.abs(png[y:y + height, x:x + width] - inner).max() <= 1:
                return y, x
    return None


# ------------------------------------------------------------------ the grid
def test_fixed_noise_repeats_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b = fixed_noise(4, 16, seed=3), fixed_noise(4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert not torch.equal(a, fixed_noise(4, 16, seed=4))
    assert torch.equal(before, torch.get_rng_state())


@pytest.mark.parametrize("norm_pix", [False, True])
def test_grid_columns_are_input_masked_input_prediction_and_pasted(norm_pix):
    model, imgs, noise = tiny_mae(norm_pix_loss=norm_pix), normalised_images(3), fixed_noise(3, 16)
    _, pred, mask = model_outputs(model, imgs, noise)
    if norm_pix:  # the prediction is in per-patch normalised units: back to pixels with each target patch's stats
        patches = model.patchify(imgs)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, unbiased=True, keepdim=True)
        pred = pred * torch.sqrt(var + 1e-6) + mean
    expected_recon = by_hand_display(model.unpatchify(pred), IMAGENET_MEAN, IMAGENET_STD)
    expected_original = by_hand_display(imgs, IMAGENET_MEAN, IMAGENET_STD)
    removed = by_hand_pixel_mask(mask)
    assert int(mask[0].sum()) == 12

    grid = draw(model, imgs, noise, [0.75], IMAGENET_MEAN, IMAGENET_STD, "header")
    assert grid.shape == (3, PAD + 3 * (96 + PAD), PAD + 4 * (96 + PAD))
    for row in range(3):
        original, masked, recon, pasted = (cell(grid, row, column) for column in range(4))
        visible = ~removed[row]
        assert torch.allclose(original, expected_original[row], atol=1e-6)
        assert torch.allclose(recon, expected_recon[row], atol=1e-5)
        assert torch.equal(masked[:, visible], original[:, visible])
        assert (masked[:, removed[row]] == 0.5).all()
        assert torch.equal(pasted[:, visible], original[:, visible])  # the input pixels, bit for bit
        assert torch.equal(pasted[:, removed[row]], recon[:, removed[row]])
    if norm_pix:  # the de-normalisation matters at this tolerance: the raw prediction would look different
        raw = by_hand_display(model.unpatchify(model_outputs(model, imgs, noise)[1]), IMAGENET_MEAN, IMAGENET_STD)
        assert (raw[0] - cell(grid, 0, 2)).abs().max() > 0.1


def test_grey_images_become_grey_rgb_and_larger_images_are_not_enlarged():
    model = tiny_mae(in_chans=1)
    grid = draw(model, normalised_images(2, channels=1), fixed_noise(2, 16), [0.75], GREY_MEAN, GREY_STD, "")
    assert grid.shape[0] == 3 and torch.equal(grid[0], grid[1]) and torch.equal(grid[1], grid[2])
    hog, _ = hog_mae(in_chans=1)  # grey columns next to a coloured heat map
    grid = draw(hog, normalised_images(2, channels=1), fixed_noise(2, 16), [0.75], GREY_MEAN, GREY_STD, "")
    original = cell(grid, 1, 0)
    assert torch.equal(original[0], original[1]) and torch.equal(original[1], original[2])
    assert torch.allclose(original[0], by_hand_display(normalised_images(2, channels=1), GREY_MEAN, GREY_STD)[1, 0])
    big = tiny_mae(img_size=96)
    grid = draw(big, normalised_images(1, size=96), fixed_noise(1, 576), [0.75], IMAGENET_MEAN, IMAGENET_STD, "")
    assert grid.shape == (3, 96 + 2 * PAD, PAD + 4 * (96 + PAD))


def test_a_ratio_sweep_removes_more_patches_of_one_ordering_and_restores_the_modes():
    model, imgs, noise = tiny_mae(), normalised_images(2), fixed_noise(2, 16)
    model.train()
    model.decoder_blocks.eval()  # a partly frozen model keeps its mixed modes
    grid = draw(model, imgs, noise, [0.5, 0.75, 0.9], IMAGENET_MEAN, IMAGENET_STD, "")
    assert model.training and model.blocks[0].training and not model.decoder_blocks[0].training
    assert grid.shape[1] == PAD + 6 * (96 + PAD)  # a block of two rows per ratio
    greys = [(cell(grid, row, 1) == 0.5).all(0)[::4, ::4] for row in (0, 2, 4)]  # image 0 at each ratio
    assert [int(g.sum()) for g in greys] == [8, 12, 15]
    assert (greys[1] >= greys[0]).all() and (greys[2] >= greys[1]).all()
    lines = [run_model(model, imgs, noise, ratio, IMAGENET_MEAN, IMAGENET_STD)[1] for ratio in (0.5, 0.9)]
    assert "8 of 16 patches removed" in lines[0] and "15 of 16 patches removed" in lines[1]


def test_png_shows_the_grid_pixel_for_pixel_under_its_caption(tmp_path):
    model, imgs, noise = tiny_mae(norm_pix_loss=True), normalised_images(2), fixed_noise(2, 16)
    grid = draw(model, imgs, noise, [0.5, 0.75], IMAGENET_MEAN, IMAGENET_STD, "header", tmp_path / "a" / "x.png")
    png = np.asarray(Image.open(tmp_path / "a" / "x.png").convert("RGB")).astype(float)
    where = find_in_png(png, grid)
    assert where is not None
    assert where[0] > 40  # caption and column titles above
    assert (png[:where[0]] < 100).any()  # dark text there


def test_a_non_pixel_model_draws_a_similarity_map_not_pixels():
    model, target = hog_mae()
    imgs, noise = normalised_images(2), fixed_noise(2, 16)
    _, pred, mask = model_outputs(model, imgs, noise)
    cosine = F.cosine_similarity(pred, target(imgs), dim=-1)
    model.train()
    grid = draw(model, imgs, noise, [0.75], IMAGENET_MEAN, IMAGENET_STD, "")
    assert model.training
    assert grid.shape[2] == PAD + 3 * (96 + PAD)  # original | masked | heat map
    original = by_hand_display(imgs, IMAGENET_MEAN, IMAGENET_STD)
    viridis = matplotlib.colormaps["viridis"]
    for row in range(2):
        heat = cell(grid, row, 2)
        for k in range(16):
            r, c = 4 * (k // 4), 4 * (k % 4)
            if mask[row, k]:  # a removed patch in the colour of its similarity
                colour = torch.tensor(viridis(float(cosine[row, k].clamp(0, 1)))[:3], dtype=torch.float32)
                assert torch.allclose(heat[:, r:r + 4, c:c + 4], colour.view(3, 1, 1).expand(3, 4, 4), atol=1e-6)
            else:  # a visible one shows the input
                assert torch.allclose(heat[:, r:r + 4, c:c + 4], original[row, :, r:r + 4, c:c + 4], atol=1e-6)
    _, line = run_model(model, imgs, noise, 0.75, IMAGENET_MEAN, IMAGENET_STD)
    assert f"mean cosine on removed patches {float((cosine * mask).sum() / mask.sum()):.3f}" in line


# ------------------------------------------------------------------ during pretraining
def run_args(data_path, output_dir, **extra):
    return argparse.Namespace(dataset="imagefolder", data_path=data_path, input_size=32, mask_ratio=0.75,
                              output_dir=str(output_dir), log_dir="", **extra)


def test_logger_writes_png_and_tensorboard_image_and_touches_no_rng(imagefolder, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = tiny_mae(norm_pix_loss=True, img_size=32)
    logger = ReconstructionLogger(run_args(imagefolder, tmp_path / "out"), num_images=4)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    model.train()
    rng_before = torch.get_rng_state()
    path = logger.log(model, 3, writer)
    logger.log(model, 4, writer)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert model.training
    writer.close()

    assert path == str(tmp_path / "out" / "vis" / "epoch_0003.png")
    assert (tmp_path / "out" / "vis" / "epoch_0004.png").is_file()
    expected = draw(model, logger.images, fixed_noise(4, 64), [0.75], IMAGENET_MEAN, IMAGENET_STD, "")
    assert find_in_png(np.asarray(Image.open(path).convert("RGB")).astype(float), expected) is not None

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    logged = events.Images("reconstruction")
    assert [e.step for e in logged] == [3, 4]
    for event in logged:  # same images, same masks, same weights: the grid of epoch 3 twice
        pixels = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB")).astype(float)
        assert np.abs(pixels - expected.permute(1, 2, 0).numpy() * 255).max() <= 1


def test_logger_uses_spread_held_out_images(imagefolder, tmp_path):
    args = run_args(imagefolder, tmp_path)
    logger = ReconstructionLogger(args, num_images=4)
    assert logger.images.shape == (4, 3, 32, 32)
    # evenly spread over the class-sorted validation split (2 classes x 8) with the evaluation transform: first
    # and last image of the split, so both classes show
    val = build_dataset("val", args)
    assert torch.equal(logger.images[0], val[0][0]) and torch.equal(logger.images[-1], val[len(val) - 1][0])
    assert val[0][1] != val[len(val) - 1][1]
    args.data_path = make_imagefolder(tmp_path / "train_only", splits=("train",))
    assert ReconstructionLogger(args, num_images=20).images.shape == (16, 3, 32, 32)
    args.output_dir = ""
    assert ReconstructionLogger(args).log(tiny_mae(img_size=32), 0) is None  # nowhere to write


def test_logger_with_a_target_draws_the_similarity_grid(tmp_path):
    model, _ = hog_mae(in_chans=3)
    data = make_imagefolder(tmp_path / "d", num_classes=2, per_class=2, size=16)
    args = run_args(data, tmp_path / "out")
    args.input_size = 16
    path = ReconstructionLogger(args, num_images=2).log(model, 0)
    expected = draw(model, ReconstructionLogger(args, 2).images, fixed_noise(2, 16), [0.75], IMAGENET_MEAN,
                    IMAGENET_STD, "")
    assert expected.shape[2] == PAD + 3 * (96 + PAD)
    assert find_in_png(np.asarray(Image.open(path).convert("RGB")).astype(float), expected) is not None


# ------------------------------------------------------------------ loss curve
def write_log(path, rows, extra=""):
    """One line per row: a dict as JSON, a string as it is (a torn line)."""
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows) + extra)
    return path


def test_loss_curve_reads_the_last_line_of_each_epoch_and_skips_torn_lines(tmp_path):
    rows = [{"train_loss": loss, "train_lr": lr, "epoch": epoch}
            for epoch, loss, lr in [(0, 1.2, 1e-5), (1, 0.9, 2e-5), (2, 0.95, 3e-5), (3, 0.7, 2.5e-5)]]
    # lines in any order; a resumed run writes epoch 2 again after epoch 3; a crash tears a line in the middle
    # and one at the end; a JSON line that is no record is skipped too
    log = write_log(tmp_path / "log.txt", [rows[1], rows[0], '{"train_loss": 0.8, "ep', *rows[2:],
                                           {"train_loss": 0.97, "train_lr": 3.1e-5, "epoch": 2}, [1, 2]], '{"train_lo')
    records = read_log(log)
    assert [r["epoch"] for r in records] == [0, 1, 2, 3]
    assert [r["train_loss"] for r in records] == [1.2, 0.9, 0.97, 0.7]
    assert [r["train_lr"] for r in records] == [1e-5, 2e-5, 3.1e-5, 2.5e-5]
    out = plot_loss_curve(log, tmp_path / "plots" / "loss.png")
    assert out == str(tmp_path / "plots" / "loss.png") and Image.open(out).size == (800, 550)
    with pytest.raises(UserError, match="no JSON lines with an epoch"):
        plot_loss_curve(write_log(tmp_path / "empty.txt", [], '{"torn'), tmp_path / "empty.png")


# ------------------------------------------------------------------ visualize.py
def save_tiny_checkpoint(path, in_chans=3, dataset="imagefolder", norm_pix_loss=True, encoder_only=False):
    """A main_pretrain.py-style checkpoint of a registered model at 16 px (16 patches of 4 px)."""
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=16, in_chans=in_chans, norm_pix_loss=norm_pix_loss)
    state = model.state_dict()
    if encoder_only:  # like the released mae_pretrain_vit_*.pth: weights only, no decoder
        torch.save({"model": {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}}, path)
    else:
        args = {"model": "mae_vit_tiny_patch4", "input_size": 16, "norm_pix_loss": norm_pix_loss, "dataset": dataset}
        torch.save({"model": state, "optimizer": {}, "epoch": 4, "scaler": {}, "args": args}, path)
    return path


def save_target_checkpoint(path, target="hog", pred_dim=108, **extra):
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=16)
    model.decoder_pred = torch.nn.Linear(model.decoder_pred.in_features, pred_dim)
    args = {"model": "mae_vit_tiny_patch4", "input_size": 16, "norm_pix_loss": False, "dataset": "imagefolder",
            "target": target, **extra}
    torch.save({"model": model.state_dict(), "epoch": 2, "args": args}, path)
    return path


def cli_args(*argv):
    return visualize.get_args_parser().parse_args([str(a) for a in argv])


def png_size(path):
    return Image.open(path).size


def test_cli_mask_ratio_sweep_writes_one_figure(imagefolder, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint-4.pth")
    out = tmp_path / "figs" / "sweep.png"
    images = os.path.join(imagefolder, "val", "class_00")
    result = run_program("visualize.py", "--checkpoint", checkpoint, "--images", images, "--max_images", "3",
                         "--mask_ratio", "0.5", "0.75", "0.9", "--output", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "norm_pix_loss True" in result.stdout and f"wrote {out}" in result.stdout
    width, height = png_size(out)
    assert width >= PAD + 4 * (96 + PAD) and height >= PAD + 9 * (96 + PAD)  # three ratios of three images


def test_cli_draws_what_the_model_predicts(imagefolder, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pth")
    image_file = os.path.join(imagefolder, "val", "class_01", "img_000.png")
    out = tmp_path / "x.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", image_file, "--output", out, "--device", "cpu",
                            "--seed", "5"))
    model = build_model("mae_vit_tiny_patch4", img_size=16, norm_pix_loss=True)
    model.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    imgs = visualize.load_images([image_file], 16, 3, IMAGENET_MEAN, IMAGENET_STD)
    expected = draw(model, imgs, fixed_noise(1, 16, seed=5), [0.75], IMAGENET_MEAN, IMAGENET_STD, "")
    assert find_in_png(np.asarray(Image.open(out).convert("RGB")).astype(float), expected) is not None


def test_cli_encoder_only_checkpoint_is_a_one_line_error(imagefolder, tmp_path, capsys):
    # in-process through util.cli.run, as ``__main__`` calls it (the sweep test runs the real subprocess)
    checkpoint = save_tiny_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", encoder_only=True)
    args = cli_args("--checkpoint", checkpoint, "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                    "--images", os.path.join(imagefolder, "val", "class_00"), "--output", tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        run(visualize.main, args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no decoder weights" in lines[0], lines
    assert "mae_visualize_vit_*.pth" in lines[0]  # says which files would do, before loading any weights
    assert not (tmp_path / "x.png").exists()


def test_cli_grey_model(imagefolder, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "grey.pth", in_chans=1, dataset="fashion_mnist", norm_pix_loss=False)
    image_file = os.path.join(imagefolder, "val", "class_01", "img_000.png")  # RGB file, converted to grey
    out = tmp_path / "grey.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", image_file, "--output", out, "--device", "cpu"))
    assert "1 channel(s)" in capsys.readouterr().out
    assert png_size(out)[0] >= PAD + 4 * (96 + PAD)
    with pytest.raises(UserError, match="expects 1-channel images but --dataset imagefolder"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", image_file, "--dataset", "imagefolder"))


def test_cli_input_errors_name_the_problem(imagefolder, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found in .*empty"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", tmp_path / "empty"))
    with pytest.raises(UserError, match="no images found in .*it has sub-folders"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", os.path.join(imagefolder, "val")))
    with pytest.raises(UserError, match="missing.png does not exist"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", broken, "--device", "cpu"))
    with pytest.raises(UserError, match="mask_ratio"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", broken, "--mask_ratio", "0.5", "1.0"))
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(checkpoint, weights_only=True)["model"]}, bare)  # no training arguments
    with pytest.raises(UserError, match="pass --model"):
        visualize.main(cli_args("--checkpoint", bare, "--images", imagefolder + "/val/class_00"))


def test_cli_hog_checkpoint_draws_the_similarity_map_and_refuses_pixel_flags(imagefolder, tmp_path, capsys):
    checkpoint = save_target_checkpoint(tmp_path / "hog.pth", hog_cell=2)
    images = os.path.join(imagefolder, "val", "class_00")
    out = tmp_path / "hog.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", images, "--max_images", "2", "--output", out,
                            "--mask_ratio", "0.5", "0.75", "--device", "cpu"))
    printed = capsys.readouterr().out
    assert "target hog" in printed and "HOG, 2-px cells, 108 values per patch" in printed
    width, height = png_size(out)
    assert width >= PAD + 3 * (96 + PAD) and height >= PAD + 4 * (96 + PAD)
    with pytest.raises(UserError, match="pretrained with --target hog: its decoder predicts no pixels"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", images, "--norm_pix_loss"))
    wrong = save_target_checkpoint(tmp_path / "wrong.pth", hog_cell=4)  # 27 HOG values, but the decoder has 108
    with pytest.raises(UserError, match="predicts 108 values per patch but the recorded target gives 27"):
        visualize.main(cli_args("--checkpoint", wrong, "--images", images, "--device", "cpu"))
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(checkpoint, weights_only=True)["model"]}, bare)
    with pytest.raises(UserError, match="does not say which target"):
        visualize.main(cli_args("--checkpoint", bare, "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                                "--images", images, "--device", "cpu"))


def test_cli_teacher_checkpoint_finds_its_moved_teacher(imagefolder, tmp_path, capsys):
    teacher = tmp_path / "teacher.pth"
    torch.save(build_model("mae_vit_tiny_patch4", img_size=16).state_dict(), teacher)
    checkpoint = save_target_checkpoint(tmp_path / "student.pth", target="teacher", pred_dim=192,
                                        teacher_model="vit_tiny_patch4", teacher_checkpoint=str(tmp_path / "moved.pth"),
                                        target_loss="cosine")
    images = os.path.join(imagefolder, "val", "class_00")
    with pytest.raises(UserError, match="moved.pth does not exist"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", images, "--device", "cpu"))
    out = tmp_path / "teacher.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", images, "--max_images", "1", "--output", out,
                            "--teacher_checkpoint", teacher, "--device", "cpu"))
    assert "teacher vit_tiny_patch4 from" in capsys.readouterr().out
    assert png_size(out)[0] >= PAD + 3 * (96 + PAD)
