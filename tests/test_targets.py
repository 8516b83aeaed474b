"""Reconstruction targets beyond pixels (util/targets.py): HOG, frozen-teacher features, and pretraining,
fine-tuning and resuming with them."""
import argparse
import copy
import json
import math

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import main_finetune
import main_pretrain
import models_mae
from conftest import run_program, tiny_pretrain_argv
from util.errors import UserError
from util.datasets import IMAGENET_MEAN, IMAGENET_STD
from util.runtime import build_model
from util.targets import HOG_BINS, HOGTarget, TeacherTarget, build_target, hog_histograms, patch_gaussian, target_name

GREY_MEAN, GREY_STD = (0.3,), (0.4,)


class FixedTarget:
    """A target generator that returns a given tensor, whatever the images."""

    def __init__(self, values, loss="mse"):
        self.values, self.loss, self.dim = values, loss, values.shape[-1]

    def __call__(self, imgs):
        return self.values


def tiny_student(in_chans=3, img_size=32, patch_size=4, **kwargs):
    return models_mae.MaskedAutoencoderViT(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=32,
                                           depth=1, num_heads=2, decoder_embed_dim=32, decoder_depth=1,
                                           decoder_num_heads=2, **kwargs)


# ------------------------------------------------------------------ HOG
@pytest.mark.parametrize("value", [0.0, 0.7, -2.5, 123.0])
def test_hog_of_a_constant_image_is_zero(value):
    imgs = torch.full((2, 3, 32, 32), value)
    assert torch.equal(HOGTarget(16, 3, 8)(imgs), torch.zeros(2, 4, 108))


def test_a_vertical_edge_puts_its_mass_in_the_horizontal_gradient_bin():
    imgs = torch.zeros(1, 1, 16, 16)
    imgs[..., 8:] = 1.0  # dark left half, bright right half: the gradient points along x
    hist = hog_histograms(imgs, cell=4, patch=16)[0, 0]  # (9, 4, 4) cells
    touching = hist[:, :, 1:3]  # the two cell columns either side of the edge
    assert torch.allclose(touching[0], torch.ones(4, 2))  # bin 0 = orientations [0, 20) degrees
    assert touching[1:].abs().max() == 0
    assert hist[:, :, [0, 3]].abs().max() == 0  # cells away from the edge see no gradient
    # the same edge turned 90 degrees votes in the bin of 90 degrees, [80, 100)
    turned = hog_histograms(imgs.transpose(-1, -2), cell=4, patch=16)[0, 0]
    assert torch.allclose(turned[4, 1:3, :], torch.ones(2, 4)) and turned[[0, 1, 2, 3, 5, 6, 7, 8]].abs().max() == 0
    # unsigned: the bright-to-dark edge is the same orientation
    assert torch.equal(hog_histograms(1.0 - imgs, cell=4, patch=16), hist.unsqueeze(0).unsqueeze(0))


def test_a_diagonal_edge_votes_in_the_45_degree_bin():
    rows, cols = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    imgs = (rows + cols > 15).float().view(1, 1, 16, 16)  # gradient along (1, 1): 45 degrees, bin [40, 60)
    hist = hog_histograms(imgs, cell=16, patch=16)[0, 0, :, 0, 0]
    assert hist.argmax() == 2 and hist[2] > 0.99


@pytest.mark.parametrize("patch,cell,chans,dim", [(16, 8, 3, 108), (16, 4, 3, 432), (16, 16, 3, 27), (4, 2, 1, 36),
                                                  (4, 4, 1, 9), (14, 7, 3, 108), (2, 1, 3, 108)])
def test_hog_target_dimensions(patch, cell, chans, dim):
    target = HOGTarget(patch, chans, cell)
    assert target.dim == dim == (patch // cell) ** 2 * chans * HOG_BINS
    size = patch * 3
    out = target(torch.randn(2, chans, size, size))
    assert out.shape == (2, 9, dim)
    # every cell's histogram of every channel has unit length (random images have gradients everywhere), but
    # for a 1-px cell in an image corner: reflect padding mirrors the image there, so both gradients are 0
    per_cell = out.view(2, 9, (patch // cell) ** 2, chans, HOG_BINS).norm(dim=-1)
    assert (((per_cell - 1).abs() < 1e-5) | ((per_cell == 0) & (cell == 1))).all()


def test_default_cell_is_half_the_patch_and_bad_cells_are_refused():
    assert HOGTarget(16, 3).cell == 8 and HOGTarget(16, 3).dim == 108
    assert HOGTarget(4, 1).cell == 2
    with pytest.raises(UserError, match="--hog_cell 3 must divide the patch size 4"):
        HOGTarget(4, 1, 3)


def test_hog_patches_are_in_raster_order_and_batched_like_single_images():
    imgs = torch.zeros(3, 1, 28, 28)
    imgs[0, :, 9:11, 21:23] = 1.0  # a dot inside patch (row 2, column 5) of the 7 x 7 grid, off its border
    target = HOGTarget(4, 1, 2)
    out = target(imgs)
    assert out.shape == (3, 49, 36)
    assert set(out[0].abs().sum(-1).nonzero().flatten().tolist()) == {2 * 7 + 5}
    imgs[1:] = torch.randn(2, 1, 28, 28)
    batched = target(imgs)
    for i in range(3):
        assert torch.allclose(batched[i], target(imgs[i:i + 1])[0], atol=1e-6)


def test_gaussian_weighting_is_centred_on_each_patch_with_std_half_the_patch():
    weights = patch_gaussian(8, 8, 4, "cpu")
    assert torch.equal(weights[:4, :4], weights[4:, 4:])  # tiled per patch
    assert torch.equal(weights[:4, :4], weights[:4, :4].t()) and weights[1, 1] == weights[:4, :4].max()
    one_d = weights[1, :4] / weights[1, 1]  # offsets -1.5, -0.5, 0.5, 1.5 from the centre, std 2
    assert torch.allclose(one_d, torch.exp(-0.5 * (torch.tensor([-1.5, -0.5, 0.5, 1.5]) / 2) ** 2) / math.exp(-0.5 / 16))


def test_hog_gaussian_weighting_changes_the_histogram_as_computed_by_hand():
    """One 16-px patch as one cell: a vertical step through the patch centre (columns 7 | 8) and a horizontal step
    far above it (rows 1 | 2). Sobel gives gx = 4 on columns 7 and 8 (orientation 0: bin 0), gy = 4 on rows 1 and
    2 (90 degrees: bin 4), both where they cross (45 degrees, magnitude 4 sqrt 2: bin 2). Unweighted, bins 0 and 4
    would be equal (14 x 2 pixels each); the Gaussian of std 8 around the patch centre (7.5, 7.5) weighs the far
    edge less."""
    p = 16
    rows, cols = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    imgs = ((cols >= 8).float() + (rows >= 2).float()).view(1, 1, p, p)
    w = torch.exp(-0.5 * ((torch.arange(p, dtype=torch.float64) - 7.5) / 8) ** 2)  # per row / column
    near, far = torch.zeros(p, dtype=torch.bool), torch.zeros(p, dtype=torch.bool)
    near[[7, 8]], far[[1, 2]] = True, True

    def histogram(weight):
        hist = torch.zeros(HOG_BINS, dtype=torch.float64)
        hist[0] = 4 * weight[~far].sum() * weight[near].sum()
        hist[4] = 4 * weight[far].sum() * weight[~near].sum()
        hist[2] = 4 * math.sqrt(2) * weight[far].sum() * weight[near].sum()
        return hist / hist.norm()

    expected, unweighted = histogram(w), histogram(torch.ones(p, dtype=torch.float64))
    assert unweighted[0] == unweighted[4] and expected[0] > 1.1 * expected[4]  # the weighting matters here
    hist = hog_histograms(imgs, cell=p, patch=p)[0, 0, :, 0, 0]
    torch.testing.assert_close(hist.double(), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(HOGTarget(p, 1, p)(imgs)[0, 0].double(), expected, atol=1e-6, rtol=1e-6)


def test_hog_runs_in_float32_under_autocast():
    imgs = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = HOGTarget(16, 3, 8)(imgs)
    assert out.dtype == torch.float32 and torch.allclose(out, HOGTarget(16, 3, 8)(imgs))


# ------------------------------------------------------------------ losses and the model
@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "cosine"])
def test_model_loss_with_a_target_counts_removed_patches_only(kind):
    torch.manual_seed(0)
    model = tiny_student()
    imgs, wanted = torch.randn(2, 3, 32, 32), torch.randn(2, 64, 7)
    model.set_target(FixedTarget(wanted, kind))
    loss, pred, mask = model(imgs, 0.75)
    assert pred.shape == (2, 64, 7)
    removed = mask.bool()
    if kind == "mse":
        expected = ((pred - wanted) ** 2).mean(-1)[removed].mean()
    elif kind == "smooth_l1":
        diff = (pred - wanted).abs()
        expected = torch.where(diff < 1, 0.5 * diff ** 2, diff - 0.5).mean(-1)[removed].mean()
    else:
        expected = (2 - 2 * F.cosine_similarity(pred, wanted, dim=-1))[removed].mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # the targets of visible patches do not count
    noise = torch.rand(2, 64)
    base, _, mask = model(imgs, 0.75, noise=noise)
    changed = wanted.clone()
    changed[~mask.bool()] = 100.0
    model.set_target(FixedTarget(changed, kind))
    assert model(imgs, 0.75, noise=noise)[0].item() == pytest.approx(base.item(), rel=1e-6)


def test_an_unknown_target_loss_is_refused():
    model = tiny_student()
    model.set_target(FixedTarget(torch.zeros(1, 64, 2), "l3"))
    with pytest.raises(ValueError, match="unknown target loss"):
        model(torch.randn(1, 3, 32, 32))


# ------------------------------------------------------------------ teacher
@pytest.fixture(scope="module")
def timm_teacher_file(tmp_path_factory):
    """A small randomly initialised timm ViT (test_vit: 64-d, 6 blocks, 16-px patches) saved like a download."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "test_vit.pth"
    torch.save(timm.create_model("test_vit").state_dict(), path)
    return path


def teacher_settings(path, **extra):
    return {"target": "teacher", "teacher_model": "test_vit", "teacher_checkpoint": str(path), **extra}


def test_teacher_target_shapes_normalisation_and_frozen_state(timm_teacher_file):
    student = tiny_student()
    target = build_target(teacher_settings(timm_teacher_file), student, IMAGENET_MEAN, IMAGENET_STD)
    assert target.dim == 64 and target.loss == "smooth_l1"
    out = target(torch.randn(3, 3, 32, 32))
    assert out.shape == (3, 64, 64)  # the teacher's 2 x 2 grid of 16-px patches resampled to the student's 8 x 8
    assert torch.allclose(out.mean(-1), torch.zeros(3, 64), atol=1e-5)
    assert torch.allclose(out.var(-1, unbiased=False), torch.ones(3, 64), atol=1e-3)
    assert not target.teacher.training and not any(p.requires_grad for p in target.teacher.parameters())
    # the file's weights were loaded (a fresh random ViT gives other features)
    saved = torch.load(timm_teacher_file, weights_only=True)
    assert torch.equal(target.teacher.blocks[0].attn.qkv.weight, saved["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("data_chans", [3, 1])
def test_teacher_features_are_its_patch_tokens_with_its_own_input_normalisation(data_chans):
    """Against a hand-run forward: class and register tokens dropped, no final norm, the teacher's mean/std."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, reg_tokens=2, num_classes=0)
    data_mean, data_std = (IMAGENET_MEAN, IMAGENET_STD) if data_chans == 3 else (GREY_MEAN, GREY_STD)
    target = TeacherTarget(vit, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), data_mean=data_mean, data_std=data_std,
                           input_size=32, grid=(4, 4), layer=-1)
    imgs = torch.randn(2, data_chans, 32, 32)
    pixels = imgs * torch.tensor(data_std).view(1, -1, 1, 1) + torch.tensor(data_mean).view(1, -1, 1, 1)
    x = (pixels.expand(-1, 3, -1, -1) - torch.tensor([0.5, 0.4, 0.3]).view(1, 3, 1, 1)) / torch.tensor(
        [0.2, 0.25, 0.3]).view(1, 3, 1, 1)
    vit.norm = torch.nn.Identity()  # the target is the last block's output, before the final norm
    with torch.no_grad():
        tokens = vit.forward_features(x)[:, vit.num_prefix_tokens:]
    assert vit.num_prefix_tokens == 3
    expected = F.layer_norm(tokens, (32,), eps=1e-6)
    assert torch.allclose(target(imgs), expected, atol=1e-5)


@pytest.mark.parametrize("grid", [(8, 8), (6, 8)], ids=["8-8", "6-8"])
def test_teacher_features_on_another_grid_are_resampled_bilinearly(grid):
    """A teacher with 8-px patches (a 4 x 4 grid at 32 px) for a student grid of 8 x 8 (4-px patches) or 6 x 8:
    the teacher's patch tokens, computed here by a plain forward, as a (N, D, 4, 4) map resampled with
    F.interpolate(bilinear, align_corners=False), in the student's raster order, then the non-affine LayerNorm."""
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=0)
    target = TeacherTarget(vit, mean=IMAGENET_MEAN, std=IMAGENET_STD, data_mean=IMAGENET_MEAN, data_std=IMAGENET_STD,
                           input_size=32, grid=grid, layer=-1)
    imgs = torch.randn(2, 3, 32, 32)
    mean, std = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    plain = copy.deepcopy(vit).eval()
    plain.norm = torch.nn.Identity()  # the last block's output, before the final norm
    with torch.no_grad():
        tokens = plain.forward_features((imgs * std + mean - mean) / std)[:, plain.num_prefix_tokens:]  # (2, 16, 32)
    teacher_map = tokens.transpose(1, 2).reshape(2, 32, 4, 4)  # rows of the teacher's grid first
    resampled = F.interpolate(teacher_map, size=grid, mode="bilinear", align_corners=False)
    expected = F.layer_norm(resampled.flatten(2).transpose(1, 2), (32,), eps=1e-6)
    out = target(imgs)
    assert out.shape == (2, grid[0] * grid[1], 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_teacher_layer_is_chosen_and_checked(timm_teacher_file):
    student = tiny_student()
    last = build_target(teacher_settings(timm_teacher_file), student, IMAGENET_MEAN, IMAGENET_STD)
    first = build_target(teacher_settings(timm_teacher_file, teacher_layer=0), student, IMAGENET_MEAN, IMAGENET_STD)
    imgs = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(first(imgs), last(imgs))
    assert torch.allclose(build_target(teacher_settings(timm_teacher_file, teacher_layer=5), student, IMAGENET_MEAN,
                                       IMAGENET_STD)(imgs), last(imgs))  # test_vit has 6 blocks: 5 is -1
    with pytest.raises(UserError, match="--teacher_layer 6"):
        build_target(teacher_settings(timm_teacher_file, teacher_layer=6), student, IMAGENET_MEAN, IMAGENET_STD)


def test_no_gradient_reaches_the_teacher_and_the_loss_falls_on_a_fixed_batch(timm_teacher_file):
    torch.manual_seed(0)
    settings = teacher_settings(timm_teacher_file, target_loss="cosine")
    student = build_model("mae_vit_tiny_patch4", img_size=32, depth=1, decoder_depth=1)
    target = build_target(settings, student, IMAGENET_MEAN, IMAGENET_STD)
    student.set_target(target)
    assert student.decoder_pred.out_features == 64 and student.target_loss == "cosine"
    imgs, noise = torch.randn(4, 3, 32, 32), torch.rand(4, 64)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    student.train()
    losses = []
    for _ in range(8):
        loss = student(imgs, 0.75, noise=noise)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(p.grad is None for p in target.teacher.parameters())
    assert student.blocks[0].attn.qkv.weight.grad is not None
    assert not target.teacher.training  # the student's train() did not reach it
    assert losses[-1] < 0.7 * losses[0], losses
    # the teacher is no part of the student: not in its state dict or parameters
    teacher_ids = {id(p) for p in target.teacher.parameters()}
    assert not teacher_ids & {id(p) for p in student.parameters()}


def test_teacher_from_one_of_our_mae_checkpoints_is_its_encoder(tmp_path):
    torch.manual_seed(0)
    mae = build_model("mae_vit_tiny_patch4", img_size=16, in_chans=1)
    path = tmp_path / "checkpoint-3.pth"
    torch.save({"model": mae.state_dict(), "epoch": 3,
                "args": {"model": "mae_vit_tiny_patch4", "input_size": 16, "dataset": "fashion_mnist"}}, path)
    student = tiny_student(in_chans=1, img_size=16)
    from util.datasets import FASHION_MNIST_MEAN, FASHION_MNIST_STD

    target = build_target({"target": "teacher", "teacher_checkpoint": str(path)}, student, FASHION_MNIST_MEAN,
                          FASHION_MNIST_STD)
    assert "encoder of mae_vit_tiny_patch4" in target.describe() and target.dim == 192
    imgs = torch.randn(2, 1, 16, 16)
    with torch.no_grad():  # all patches kept, in order; the encoder's final norm is still the identity affine
        latent, _, _ = mae.forward_encoder(imgs, 0.0, noise=torch.arange(16.0).expand(2, -1))
    assert torch.allclose(target(imgs), latent[:, 1:], atol=1e-4)


def test_teacher_errors_are_one_clear_line(tmp_path, timm_teacher_file):
    student = tiny_student()
    with pytest.raises(UserError, match="needs --teacher_checkpoint"):
        build_target({"target": "teacher", "teacher_model": "test_vit"}, student, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(UserError, match="does not exist"):
        build_target(teacher_settings(tmp_path / "gone.pth"), student, IMAGENET_MEAN, IMAGENET_STD)
    with pytest.raises(UserError, match="does not fit the teacher test_vit2"):
        build_target(teacher_settings(timm_teacher_file, teacher_model="test_vit2"), student, IMAGENET_MEAN,
                     IMAGENET_STD)
    bare = tmp_path / "bare.pth"
    torch.save({"blocks.0.attn.qkv.weight": torch.zeros(3)}, bare)
    with pytest.raises(UserError, match="pass --teacher_model"):
        build_target({"target": "teacher", "teacher_checkpoint": str(bare)}, student, IMAGENET_MEAN, IMAGENET_STD)


# ------------------------------------------------------------------ flags
def parsed(*argv):
    return main_pretrain.get_args_parser().parse_args(["--data_path", "x", *argv])


def test_target_flags_resolve_and_conflicts_are_refused():
    assert target_name(parsed("--norm_pix_loss")) == "norm_pixel"
    assert target_name(parsed("--target", "norm_pixel")) == "norm_pixel"
    assert target_name(parsed()) == "pixel"
    assert target_name(parsed("--target", "teacher", "--teacher_checkpoint", "t.pth")) == "teacher"
    for argv, message in [(("--norm_pix_loss", "--target", "hog"), "--norm_pix_loss means --target norm_pixel"),
                          (("--norm_pix_loss", "--target", "pixel"), "conflicts with --target pixel"),
                          (("--target", "hog", "--teacher_model", "test_vit"), "--teacher_model applies to --target"),
                          (("--target_loss", "cosine",), "--target_loss applies to --target teacher, not pixel"),
                          (("--hog_cell", "4",), "--hog_cell applies to --target hog"),
                          (("--target", "hog", "--teacher_layer", "2"), "--teacher_layer applies")]:
        with pytest.raises(UserError, match=message):
            target_name(parsed(*argv))


# ------------------------------------------------------------------ pretraining, fine-tuning, resuming
def pretrain(imagefolder, out, *extra):
    args = main_pretrain.get_args_parser().parse_args(
        tiny_pretrain_argv(imagefolder, out, "--epochs", "1", "--vis_freq", "1", "--vis_images", "2", *extra))
    main_pretrain.main(args)
    return torch.load(out / "checkpoint-last.pth", weights_only=True)


@pytest.fixture(scope="module")
def pixel_checkpoint(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pixel")
    pretrain(imagefolder, out)
    return out / "checkpoint-last.pth"


@pytest.fixture(scope="module")
def hog_checkpoint(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("hog")
    pretrain(imagefolder, out, "--target", "hog", "--hog_cell", "2")
    return out / "checkpoint-last.pth"


def student_keys():
    return set(build_model("mae_vit_tiny_patch4", img_size=32).state_dict())


@pytest.mark.parametrize("extra,target,pred_dim", [
    ((), "pixel", 48),
    (("--norm_pix_loss",), "norm_pixel", 48),
    (("--target", "hog"), "hog", 108),  # 4-px patches, 2-px cells: 2 x 2 cells x 3 channels x 9 bins
    (("--target", "teacher", "--teacher_model", "test_vit", "--target_loss", "cosine"), "teacher", 64),
    (("--target", "teacher"), "teacher", 192),  # the encoder of a pixel-pretrained mae_vit_tiny_patch4
])
def test_one_epoch_of_pretraining_with_each_target(imagefolder, tmp_path, timm_teacher_file, pixel_checkpoint, extra,
                                                   target, pred_dim):
    if "teacher" in extra:
        teacher = timm_teacher_file if "--teacher_model" in extra else pixel_checkpoint
        extra = (*extra, "--teacher_checkpoint", teacher)
    out = tmp_path / "out"
    checkpoint = pretrain(imagefolder, out, *extra)
    line = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert math.isfinite(line["train_loss"]) and line["epoch"] == 0
    assert checkpoint["args"]["target"] == target
    assert checkpoint["args"]["norm_pix_loss"] == (target == "norm_pixel")
    assert checkpoint["model"]["decoder_pred.weight"].shape == (pred_dim, 192)
    # the teacher is in neither the weights nor the optimizer: exactly the student's keys and trainable tensors
    assert set(checkpoint["model"]) == student_keys()
    trainable = sum(1 for p in build_model("mae_vit_tiny_patch4", img_size=32).parameters() if p.requires_grad)
    assert len(checkpoint["optimizer"]["state"]) == trainable
    assert (out / "vis" / "epoch_0000.png").is_file()


def test_finetuning_from_a_hog_pretrained_checkpoint(imagefolder, tmp_path, hog_checkpoint, capsys):
    out = tmp_path / "ft"
    args = main_finetune.get_args_parser().parse_args(
        ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(imagefolder), "--nb_classes", "2",
         "--epochs", "1", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0", "--output_dir", str(out),
         "--log_dir", str(out), "--finetune", str(hog_checkpoint), "--aa", "none", "--reprob", "0"])
    main_finetune.main(args)
    printed = capsys.readouterr().out
    assert "was pretrained with --target hog" in printed
    line = json.loads((out / "log.txt").read_text().splitlines()[-1])
    assert "test_acc1" in line and math.isfinite(line["train_loss"])
    source = torch.load(hog_checkpoint, weights_only=True)["model"]
    tuned = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    assert set(tuned) >= {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight"}
    assert not any(k.startswith("decoder_") for k in tuned)
    assert tuned["cls_token"].shape == source["cls_token"].shape


def test_resuming_with_another_target_is_a_one_line_error(imagefolder, tmp_path, hog_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(hog_checkpoint.read_bytes())
    result = run_program("main_pretrain.py", *tiny_pretrain_argv(imagefolder, out, "--auto_resume"))
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "cannot resume from" in result.stderr and "shape mismatch for decoder_pred.weight: checkpoint (108, 192) vs model (48, 192)" \
        in result.stderr.strip().splitlines()[-1]
    args = main_pretrain.get_args_parser().parse_args(
        tiny_pretrain_argv(imagefolder, out, "--auto_resume", "--target", "hog", "--hog_cell", "4"))
    with pytest.raises(UserError, match="shape mismatch"):  # 27 HOG values per patch now, not 108
        main_pretrain.main(args)


def test_resuming_with_the_same_width_but_another_target_is_refused(imagefolder, tmp_path, pixel_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(pixel_checkpoint.read_bytes())
    args = main_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(imagefolder, out, "--auto_resume",
                                                                         "--norm_pix_loss", "--epochs", "2"))
    with pytest.raises(UserError, match="pretrained with --target pixel, this run asks for --target norm_pixel"):
        main_pretrain.main(args)


def test_saved_target_arguments_resolve_to_themselves():
    """A checkpoint's saved arguments name the target that was trained (visualize.py and resumes read them back)."""
    for argv in (("--target", "hog", "--hog_cell", "2"), ("--norm_pix_loss",), ()):
        args = parsed(*argv)
        args.target = target_name(args)
        args.norm_pix_loss = args.target == "norm_pixel"
        assert target_name(argparse.Namespace(**vars(args))) == args.target
