"""Reconstruction figures, the pretraining logger, the loss curve and visualize.py, on tiny models."""
import argparse
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import models_mae
import visualize
from conftest import run_program
from util.cli import run
from util.errors import UserError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.runtime import build_model
from util.targets import HOGTarget
from util.visualize import (GAP, MARGIN, MASK_GREY, NORM_PIX_NOTE, SIMILARITY_NOTE, ReconstructionLogger,
                            build_reconstruction_logger, compare_with_target, denormalize_patches, fixed_noise,
                            mask_to_image, paste_visible, plot_loss_curve, reconstruct, reconstruction_grid,
                            reconstruction_panel, render_figure, similarity_colours, similarity_panel, to_display)

GREY_MEAN, GREY_STD = (0.3,), (0.4,)


def tiny_mae(in_chans=3, norm_pix_loss=False, **kwargs):
    torch.manual_seed(0)
    return models_mae.MaskedAutoencoderViT(img_size=16, patch_size=4, in_chans=in_chans, embed_dim=32, depth=1,
                                           num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2,
                                           norm_pix_loss=norm_pix_loss, **kwargs)


def normalised_images(n=3, channels=3, size=16, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=generator)


def cell(figure, column, row=0, panel=0):
    top, left = figure.cells[panel][row][column]
    height, width = figure.cell_size
    return figure.image[top:top + height, left:left + width]


# ------------------------------------------------------------------ helpers
def test_fixed_noise_repeats_and_leaves_the_global_rng_alone():
    before = torch.get_rng_state()
    a, b = fixed_noise(4, 16, seed=3), fixed_noise(4, 16, seed=3)
    assert torch.equal(a, b) and a.shape == (4, 16)
    assert not torch.equal(a, fixed_noise(4, 16, seed=4))
    assert torch.equal(before, torch.get_rng_state())


def test_denormalize_patches_inverts_the_norm_pix_target_on_a_known_patch():
    model = tiny_mae(norm_pix_loss=True)
    imgs = normalised_images(1)
    known = torch.arange(4 * 4 * 3, dtype=torch.float32) * 0.25 - 3.0  # patch 0, channels last like patchify
    imgs[0, :, :4, :4] = known.view(4, 4, 3).permute(2, 0, 1)
    pixels = model.patchify(imgs)
    assert torch.equal(pixels[0, 0], known)
    # the loss's normalisation, written out: unbiased variance, eps 1e-6
    expected = (known - known.mean()) / (known.var(unbiased=True) + 1e-6) ** 0.5
    target = model.target_patches(imgs)
    assert torch.allclose(target[0, 0], expected, atol=1e-6)
    assert torch.allclose(denormalize_patches(target, pixels)[0, 0], known, atol=1e-5)
    assert torch.allclose(denormalize_patches(target, pixels), pixels, atol=1e-5)


def test_paste_visible_keeps_the_input_pixels_bit_exact():
    model = tiny_mae()
    imgs, pred = normalised_images(2), normalised_images(2, seed=2)
    mask = (fixed_noise(2, 16) > 0.5).float()
    mask_img = mask_to_image(mask, model)
    assert mask_img.shape == (2, 1, 16, 16)
    # the pixel mask follows the patch grid: patch k is rows 4*(k // 4), columns 4*(k % 4)
    for k in range(16):
        assert bool(mask_img[0, 0, 4 * (k // 4), 4 * (k % 4)]) == bool(mask[0, k])
    pasted = paste_visible(pred, imgs, mask_img)
    visible = ~mask_img.bool().expand_as(imgs)
    assert torch.equal(pasted[visible], imgs[visible])
    assert torch.equal(pasted[~visible], pred[~visible])


# ------------------------------------------------------------------ the figure
def test_rendered_grid_shows_input_pixels_in_visible_patches_and_predictions_elsewhere():
    model = tiny_mae()
    imgs, noise = normalised_images(3), fixed_noise(3, 16)
    rec = reconstruct(model, imgs, noise, 0.75)
    assert rec.num_removed == 12 and torch.equal(rec.mask.sum(1), torch.full((3,), 12.0))
    figure = render_figure("caption", [reconstruction_panel(rec, imgs, IMAGENET_MEAN, IMAGENET_STD)])
    image, caption = reconstruction_grid(model, imgs, noise, IMAGENET_MEAN, IMAGENET_STD, 0.75)
    assert np.array_equal(render_figure(caption, [reconstruction_panel(rec, imgs, IMAGENET_MEAN, IMAGENET_STD)]).image,
                          image)
    assert figure.scale == 6 and figure.cell_size == (96, 96)  # 16 px enlarged to the 96 px minimum
    expected_original = ((to_display(imgs, IMAGENET_MEAN, IMAGENET_STD) * 255).round().to(torch.uint8)
                         .permute(0, 2, 3, 1).numpy().repeat(6, 1).repeat(6, 2))
    for row in range(3):
        removed = rec.mask_img[row, 0].bool().numpy().repeat(6, 0).repeat(6, 1)
        original, masked, prediction, pasted = (cell(figure, column, row) for column in range(4))
        assert np.array_equal(original, expected_original[row])
        assert np.array_equal(pasted[~removed], original[~removed])
        assert np.array_equal(pasted[removed], prediction[removed])
        assert np.array_equal(masked[~removed], original[~removed])
        assert (masked[removed] == round(MASK_GREY * 255)).all()
    # the caption is drawn above the first cell
    assert (figure.image[:figure.cells[0][0][0][0]] < 100).any()


def test_norm_pix_grid_says_so_and_the_model_mode_is_restored():
    model = tiny_mae(norm_pix_loss=True)
    imgs, noise = normalised_images(2), fixed_noise(2, 16)
    model.train()
    model.decoder_blocks.eval()  # a partly frozen model keeps its mixed modes
    _, caption = reconstruction_grid(model, imgs, noise, IMAGENET_MEAN, IMAGENET_STD, 0.75)
    assert NORM_PIX_NOTE in caption and model.training and model.blocks[0].training
    assert not model.decoder_blocks.training and not model.decoder_blocks[0].training
    model.eval()
    _, caption = reconstruction_grid(model, imgs, noise, IMAGENET_MEAN, IMAGENET_STD, 0.75)
    assert not model.training
    assert NORM_PIX_NOTE not in reconstruction_grid(tiny_mae(), imgs, noise, IMAGENET_MEAN, IMAGENET_STD)[1]


def test_grey_images_render_as_grey_rgb():
    model = tiny_mae(in_chans=1)
    image, _ = reconstruction_grid(model, normalised_images(2, channels=1), fixed_noise(2, 16), GREY_MEAN, GREY_STD)
    assert image.ndim == 3 and image.shape[2] == 3 and image.shape[1] == 2 * MARGIN + 4 * 96 + 3 * GAP
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_the_same_noise_removes_more_patches_of_one_ordering_as_the_ratio_grows():
    model, imgs, noise = tiny_mae(), normalised_images(2), fixed_noise(2, 16)
    masks = [reconstruct(model, imgs, noise, ratio).mask for ratio in (0.5, 0.75, 0.9)]
    assert [int(m[0].sum()) for m in masks] == [8, 12, 15]
    for smaller, larger in zip(masks, masks[1:]):
        assert bool((larger >= smaller).all())


# ------------------------------------------------------------------ during pretraining
def test_logger_writes_png_and_tensorboard_image_and_touches_no_rng(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    model = tiny_mae(norm_pix_loss=True)
    logger = ReconstructionLogger(normalised_images(4), IMAGENET_MEAN, IMAGENET_STD, mask_ratio=0.75)
    writer = SummaryWriter(log_dir=str(tmp_path / "tb"))
    model.train()
    rng_before = torch.get_rng_state()
    # a compiled wrapper is unwrapped, not called (calling it would compile)
    path = logger(torch.compile(model), 3, str(tmp_path / "out"), writer)
    logger(model, 4, str(tmp_path / "out"), writer)
    assert torch.equal(rng_before, torch.get_rng_state())
    assert model.training
    writer.close()

    assert path == str(tmp_path / "out" / "vis" / "epoch_0003.png")
    first = np.asarray(Image.open(path))
    second = np.asarray(Image.open(tmp_path / "out" / "vis" / "epoch_0004.png"))
    assert first.shape == second.shape and first.shape[1] == 2 * MARGIN + 4 * 96 + 3 * GAP
    assert np.array_equal(first[-300:], second[-300:])  # same images, same masks, same weights

    events = EventAccumulator(str(tmp_path / "tb"), size_guidance={"images": 0})
    events.Reload()
    assert "reconstruction" in events.Tags()["images"]
    logged = events.Images("reconstruction")
    assert [e.step for e in logged] == [3, 4]
    assert (logged[0].width, logged[0].height) == (first.shape[1], first.shape[0])


def test_logger_built_from_the_run_arguments_uses_spread_held_out_images(imagefolder, tmp_path):
    from fakedata import make_imagefolder
    from util.datasets import build_dataset, build_transform

    args = argparse.Namespace(dataset="imagefolder", data_path=imagefolder, input_size=32, mask_ratio=0.75,
                              output_dir=str(tmp_path), log_dir="")
    logger = build_reconstruction_logger(args, num_images=4)
    assert logger.images.shape == (4, 3, 32, 32) and logger.mask_ratio == 0.75
    # evenly spread over the class-sorted validation split (2 classes x 8), evaluation transform: first and
    # last image of the split, so both classes show
    val = build_dataset("val", args, build_transform("eval", args))
    assert torch.equal(logger.images[0], val[0][0]) and torch.equal(logger.images[-1], val[len(val) - 1][0])
    assert val[0][1] != val[len(val) - 1][1]
    args.data_path = make_imagefolder(tmp_path / "train_only", splits=("train",))
    assert build_reconstruction_logger(args, num_images=20).images.shape == (16, 3, 32, 32)
    args.output_dir = ""
    assert build_reconstruction_logger(args) is None  # nowhere to write


# ------------------------------------------------------------------ loss curve
def write_log(path, rows, extra=""):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + extra)
    return path


def test_loss_curve_png_from_log_txt(tmp_path):
    rows = [{"train_loss": loss, "train_lr": lr, "epoch": epoch}
            for epoch, loss, lr in [(0, 1.2, 1e-5), (1, 0.9, 2e-5), (2, 0.95, 3e-5), (3, 0.7, 2.5e-5)]]
    # a resumed run repeats epoch 2 and the last line is torn by a crash: both handled
    log = write_log(tmp_path / "log.txt", rows + [{"train_loss": 0.97, "train_lr": 3e-5, "epoch": 2}], '{"train_lo')
    out = plot_loss_curve(log, tmp_path / "plots" / "loss.png")
    image = Image.open(out)
    assert image.size[0] == 800 and image.size[1] > 500
    single = plot_loss_curve(write_log(tmp_path / "one.txt", rows[:1]), tmp_path / "one.png")
    assert Image.open(single).size == image.size
    with pytest.raises(UserError, match="no lines"):
        plot_loss_curve(write_log(tmp_path / "empty.txt", []), tmp_path / "empty.png")


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


def cli_args(*argv):
    return visualize.get_args_parser().parse_args([str(a) for a in argv])


def test_cli_mask_ratio_sweep_writes_one_figure(imagefolder, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "checkpoint-4.pth")
    out = tmp_path / "figs" / "sweep.png"
    images = os.path.join(imagefolder, "val", "class_00")
    result = run_program("visualize.py", "--checkpoint", checkpoint, "--images", images, "--max_images", "3",
                         "--mask_ratio", "0.5", "0.75", "0.9", "--output", out, "--device", "cpu")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "norm_pix_loss True" in result.stdout
    width, height = Image.open(out).size
    cell = 96  # 16 px images enlarged 6 times
    assert width == 2 * MARGIN + 4 * cell + 3 * GAP
    rows = 3 * 3  # three ratios of three images
    assert rows * (cell + GAP) < height < rows * (cell + GAP) + 400  # plus the caption and titles


def test_cli_encoder_only_checkpoint_is_a_one_line_error(imagefolder, tmp_path, capsys):
    # in-process through util.cli.run, as ``__main__`` calls it (the sweep test runs the real subprocess)
    checkpoint = save_tiny_checkpoint(tmp_path / "mae_pretrain_vit_tiny.pth", encoder_only=True)
    args = cli_args("--checkpoint", checkpoint, "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                    "--images", os.path.join(imagefolder, "val", "class_00"), "--output", tmp_path / "x.png")
    with pytest.raises(SystemExit) as exit_info:
        run(visualize.main, args)
    assert exit_info.value.code == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "no decoder" in lines[0], lines
    assert not (tmp_path / "x.png").exists()


def test_cli_grey_model(imagefolder, tmp_path, capsys):
    checkpoint = save_tiny_checkpoint(tmp_path / "grey.pth", in_chans=1, dataset="fashion_mnist", norm_pix_loss=False)
    image_file = os.path.join(imagefolder, "val", "class_01", "img_000.png")  # RGB file, converted to grey
    out = tmp_path / "grey.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", image_file, "--output", out, "--device", "cpu"))
    assert "1 channel(s)" in capsys.readouterr().out
    image = np.asarray(Image.open(out).convert("RGB"))
    assert image.shape[1] == 2 * MARGIN + 4 * 96 + 3 * GAP
    assert np.array_equal(image[..., 0], image[..., 1]) and np.array_equal(image[..., 1], image[..., 2])


def test_cli_input_errors_name_the_problem(imagefolder, tmp_path):
    checkpoint = save_tiny_checkpoint(tmp_path / "c.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found in .*empty"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", tmp_path / "empty"))
    with pytest.raises(UserError, match="missing.png does not exist"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", tmp_path / "missing.png"))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    with pytest.raises(UserError, match="broken.png"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", broken, "--device", "cpu"))
    with pytest.raises(UserError, match="mask_ratio"):
        visualize.main(cli_args("--checkpoint", checkpoint, "--images", broken, "--mask_ratio", "1.0"))
    bare = tmp_path / "bare.pth"
    torch.save({"model": torch.load(checkpoint, weights_only=True)["model"]}, bare)  # no training arguments
    with pytest.raises(UserError, match="pass --model"):
        visualize.main(cli_args("--checkpoint", bare, "--images", imagefolder + "/val/class_00"))


# ------------------------------------------------------------------ non-pixel targets
def hog_mae(in_chans=3):
    target = HOGTarget(4, in_chans, 2)
    return tiny_mae(in_chans=in_chans, pred_dim=target.dim), target


def test_similarity_colours_follow_the_ramp():
    colours = similarity_colours(torch.tensor([-0.7, 0.0, 0.5, 1.0]))
    assert torch.allclose(colours[0], colours[1])  # below 0 looks like 0
    assert torch.allclose(colours[1], torch.tensor([0.25, 0.0, 0.45]))
    assert torch.allclose(colours[2], torch.tensor([0.85, 0.15, 0.15]))
    assert torch.allclose(colours[3], torch.tensor([1.0, 0.9, 0.2]))


def test_a_non_pixel_model_draws_a_similarity_map_not_pixels():
    model, target = hog_mae()
    imgs, noise = normalised_images(2), fixed_noise(2, 16)
    with pytest.raises(ValueError, match="not pixels"):
        reconstruct(model, imgs, noise, 0.75)
    model.train()
    cmp = compare_with_target(model, target, imgs, noise, 0.75)
    assert model.training  # mode restored
    assert cmp.similarity.shape == (2, 16) and cmp.num_removed == 12
    # the similarity is the cosine of the model's prediction and the HOG of the image, patch by patch
    with torch.no_grad():
        model.eval()
        _, pred, _ = model(imgs, 0.75, noise=noise, target=target(imgs))
    expected = torch.nn.functional.cosine_similarity(pred, target(imgs), dim=-1)
    assert torch.allclose(cmp.similarity, expected, atol=1e-5)
    figure = render_figure("caption", [similarity_panel(cmp, imgs, IMAGENET_MEAN, IMAGENET_STD)])
    assert len(figure.cells[0][0]) == 3 and figure.image.shape[1] == 2 * MARGIN + 3 * 96 + 2 * GAP
    for row in range(2):
        heat = cell(figure, 2, row)
        removed = cmp.mask_img[row, 0].bool().numpy().repeat(6, 0).repeat(6, 1)
        assert np.array_equal(heat[~removed], cell(figure, 0, row)[~removed])  # visible patches: the input
        for k in range(16):  # each removed patch in the colour of its similarity
            if cmp.mask[row, k]:
                top, left = 4 * (k // 4) * 6, 4 * (k % 4) * 6
                colour = (similarity_colours(cmp.similarity[row, k]) * 255).round().numpy()
                assert np.array_equal(heat[top:top + 24, left:left + 24].reshape(-1, 3)[0], colour)
    _, caption = reconstruction_grid(model, imgs, noise, IMAGENET_MEAN, IMAGENET_STD, target=target)
    assert SIMILARITY_NOTE in caption and "no image is reconstructed" in caption and NORM_PIX_NOTE not in caption


def test_logger_with_a_target_writes_the_similarity_grid(tmp_path):
    model, target = hog_mae(in_chans=1)
    logger = ReconstructionLogger(normalised_images(2, channels=1), GREY_MEAN, GREY_STD, 0.75, target=target)
    image = np.asarray(Image.open(logger(model, 0, str(tmp_path))))
    assert image.shape[1] == 2 * MARGIN + 3 * 96 + 2 * GAP


def save_target_checkpoint(path, target="hog", pred_dim=108, **extra):
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=16, pred_dim=pred_dim)
    args = {"model": "mae_vit_tiny_patch4", "input_size": 16, "norm_pix_loss": False, "dataset": "imagefolder",
            "target": target, **extra}
    torch.save({"model": model.state_dict(), "epoch": 2, "args": args}, path)
    return path


def test_cli_hog_checkpoint_draws_the_similarity_map_and_refuses_pixel_flags(imagefolder, tmp_path, capsys):
    checkpoint = save_target_checkpoint(tmp_path / "hog.pth", hog_cell=2)
    images = os.path.join(imagefolder, "val", "class_00")
    out = tmp_path / "hog.png"
    visualize.main(cli_args("--checkpoint", checkpoint, "--images", images, "--max_images", "2", "--output", out,
                            "--mask_ratio", "0.5", "0.75", "--device", "cpu"))
    printed = capsys.readouterr().out
    assert "target hog" in printed and "HOG, 2-px cells, 108 values per patch" in printed
    width, height = Image.open(out).size
    assert width == 2 * MARGIN + 3 * 96 + 2 * GAP and height > 4 * (96 + GAP)
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
    assert Image.open(out).size[0] == 2 * MARGIN + 3 * 96 + 2 * GAP
