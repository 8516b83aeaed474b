"""What the decoder regresses for each removed patch, besides pixels (which the model computes itself).

* ``hog`` (MaskFeat): per colour channel, 3x3 Sobel gradients (reflect padding); 9 unsigned orientation bins over
  [0, pi), each pixel voting with its gradient magnitude weighted by a Gaussian centred on its patch (std half the
  patch); votes summed over cells of ``hog_cell`` px, each cell's histogram L2-normalised; a patch's target is its
  cells' histograms (cell row, cell column, channel, bin): 2 x 2 x 3 x 9 = 108 values for 16-px patches. MSE loss.
* ``teacher`` (MaskDistill, MILAN): a frozen network's features at the patch positions from a chosen block,
  resampled to the student's patch grid, LayerNorm without affine. Smooth-L1 (MaskDistill) or 2 - 2 cos (MILAN).

A generator is a plain object with ``dim`` (values per patch) and ``loss``, held by the model through
``MaskedAutoencoderViT.set_target``: no ``nn.Module`` of the student, so never in its checkpoints, optimizer or DDP.
"""
from __future__ import annotations

import argparse
import math
import sys

import timm
import torch
import torch.nn.functional as F

from util.checkpoint import PRETRAINING_ONLY, fit_state_dict, load_checkpoint_file, model_state_dict, saved_args
from util.datasets import IMAGENET_MEAN, IMAGENET_STD, dataset_info
from util.errors import UserError, one_line
from util.runtime import build_model

TARGETS = ("pixel", "norm_pixel", "hog", "teacher")
TEACHER_LOSSES = ("smooth_l1", "cosine")
HOG_BINS = 9
# what a teacher's features (before the final norm, no head) never use, so its checkpoint may lack them
UNUSED_TEACHER_PREFIXES = ("head.", "norm.", "fc_norm.", "head_drop.")
TEACHER_FLAGS = ("teacher_model", "teacher_checkpoint", "teacher_pretrained", "teacher_input_size", "target_loss")


def default_hog_cell(patch: int) -> int:
    """MaskFeat's 2 x 2 cells per patch (8 px for 16-px patches); a whole odd patch as one cell."""
    return patch // 2 if patch % 2 == 0 else patch


def sobel_gradients(imgs: torch.Tensor):
    """3x3 Sobel derivatives (x, y down the rows) of every channel, reflect-padded. In separable form (a difference,
    then 1-2-1 smoothing): a flat region gets exactly zero, not rounding noise that the normalisation would blow up."""
    padded = F.pad(imgs, (1, 1, 1, 1), mode="reflect")
    dx = padded[..., :, 2:] - padded[..., :, :-2]  # (N, C, H + 2, W)
    dy = padded[..., 2:, :] - padded[..., :-2, :]  # (N, C, H, W + 2)
    gx = dx[..., :-2, :] + 2 * dx[..., 1:-1, :] + dx[..., 2:, :]
    gy = dy[..., :, :-2] + 2 * dy[..., :, 1:-1] + dy[..., :, 2:]
    return gx, gy


def patch_gaussian(h: int, w: int, patch: int, device, dtype=torch.float32) -> torch.Tensor:
    """(H, W) weights: a Gaussian of std patch/2 centred on each patch, tiled (MaskFeat's spatial weighting)."""
    offset = torch.arange(patch, device=device, dtype=dtype) - (patch - 1) / 2
    bump = torch.exp(-0.5 * (offset / (patch / 2)) ** 2)
    window = bump[:, None] * bump[None, :]
    return window.repeat(h // patch, w // patch)


def hog_histograms(imgs: torch.Tensor, cell: int, patch: int) -> torch.Tensor:
    """(N, C, H, W) -> per-channel, per-cell L2-normalised 9-bin histograms (N, C, 9, H/cell, W/cell)."""
    n, c, h, w = imgs.shape
    gx, gy = sobel_gradients(imgs)
    magnitude = torch.hypot(gx, gy) * patch_gaussian(h, w, patch, imgs.device, imgs.dtype)
    angle = torch.atan2(gy, gx).remainder(math.pi)
    bins = (angle * (HOG_BINS / math.pi)).floor().long().clamp_(0, HOG_BINS - 1)
    votes = torch.zeros(n, c, HOG_BINS, h, w, device=imgs.device, dtype=imgs.dtype)
    votes.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
    # the mean over a cell: the normalisation removes its constant factor
    cells = F.avg_pool2d(votes.view(n, c * HOG_BINS, h, w), cell).view(n, c, HOG_BINS, h // cell, w // cell)
    return F.normalize(cells, p=2, dim=2)


class HOGTarget:
    """Callable: normalised images (N, C, H, W) -> HOG target per patch (N, L, dim)."""

    name = "hog"
    loss = "mse"

    def __init__(self, patch: int, in_chans: int, cell: int | None = None):
        cell = cell or default_hog_cell(patch)
        if cell <= 0 or patch % cell:
            raise UserError(f"--hog_cell {cell} must divide the patch size {patch} (e.g. {default_hog_cell(patch)})")
        self.patch, self.cell, self.in_chans = patch, cell, in_chans
        self.dim = (patch // cell) ** 2 * in_chans * HOG_BINS

    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        n, c, h, w = imgs.shape
        p, k = self.patch, self.patch // self.cell
        # float32 even under autocast: atan2 and the bin edges are not for bf16
        with torch.no_grad(), torch.autocast(device_type=imgs.device.type, enabled=False):
            hist = hog_histograms(imgs.float(), self.cell, p)
        hist = hist.reshape(n, c, HOG_BINS, h // p, k, w // p, k)
        # (N, grid rows, grid cols, cell row, cell col, channel, bin): one patch's cells side by side
        hist = hist.permute(0, 3, 5, 4, 6, 1, 2)
        return hist.reshape(n, (h // p) * (w // p), self.dim)

    def describe(self) -> str:
        return f"HOG, {self.cell}-px cells, {self.dim} values per patch"


def _first_conv_channels(model: torch.nn.Module) -> int:
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            return module.in_channels
    raise UserError(f"cannot tell how many input channels the teacher {type(model).__name__} takes")


def _stats_for(values, channels: int, what: str):
    """Per-channel statistics for a ``channels``-channel network: as given, averaged to one, or repeated."""
    values = tuple(float(v) for v in values)
    if len(values) not in (1, channels) and channels != 1:
        raise UserError(f"{what} has {len(values)} channel statistics for a {channels}-channel network")
    return values if len(values) == channels else (sum(values) / len(values),) * channels


def _create_teacher(name: str, img_size: int, pretrained: bool, in_chans: int | None) -> torch.nn.Module:
    kwargs = dict(num_classes=0, img_size=img_size, pretrained=pretrained, **{"in_chans": in_chans} if in_chans else {})
    if name in timm.list_models(module="models_vit"):
        kwargs["global_pool"] = False  # the MAE layout: class token, final norm (unused, but its keys load)
    try:
        try:
            return build_model(name, **kwargs)
        except TypeError:  # a convolutional network takes any size and has no img_size argument
            return build_model(name, **{k: v for k, v in kwargs.items() if k != "img_size"})
    except Exception as e:  # else only a hub download fails here: no network, no such weights, no permission
        if isinstance(e, (UserError, TypeError)) or not pretrained:
            raise
        raise UserError(f"cannot download timm's weights for the teacher {name} (offline? pass --teacher_checkpoint "
                        f"FILE instead): {one_line(e)}") from None


def load_teacher(model_name, checkpoint, pretrained: bool, img_size: int):
    """``(teacher, mean, std, description)``: the network and the statistics its inputs are normalised with.
    ``checkpoint``: weights as ``load_checkpoint_file`` reads them; without ``model_name`` they must name their model
    (ours by their arguments, a timm directory by its config).
    ``pretrained``: timm's hub weights instead, downloaded only then."""
    if pretrained == bool(checkpoint):
        raise UserError("--target teacher needs --teacher_checkpoint FILE or (not both) --teacher_pretrained with "
                        "--teacher_model to download timm's weights")
    loaded = load_checkpoint_file(checkpoint) if checkpoint else {}
    saved = saved_args(loaded)
    model_name = model_name or saved.get("model")
    if not model_name:
        raise UserError(f"{checkpoint or '--teacher_pretrained'} names no model; pass --teacher_model "
                        f"(a timm name such as vit_tiny_patch16_224)")
    name = model_name.removeprefix("mae_").split("_dec")[0]  # a mae_vit_* checkpoint gives its vit_* encoder
    state = model_state_dict(loaded, checkpoint) if checkpoint else {}
    patch_weight = state.get("patch_embed.proj.weight")
    teacher = _create_teacher(name, img_size, pretrained, patch_weight.shape[1] if patch_weight is not None else None)
    if checkpoint:
        # without the decoder and mask token: timm's ViT filter would take a 'mask_token' for DINOv2's
        state = {k: v for k, v in state.items() if not k.startswith(PRETRAINING_ONLY)}
        # timm's own conversion for the architecture (e.g. resampling a ViT's position table to this input size)
        filter_fn = getattr(sys.modules.get(type(teacher).__module__), "checkpoint_filter_fn", None)
        try:
            state = filter_fn(state, teacher) if filter_fn else state
        except Exception as e:  # a file of another architecture fails in the conversion
            raise UserError(f"{checkpoint} does not fit the teacher {name}: {type(e).__name__}: {e}") from None
        fit_state_dict(teacher, state, checkpoint, may_miss=UNUSED_TEACHER_PREFIXES, may_ignore=("",), adapt=False,
                       name=f"the teacher {name}")
    if saved.get("dataset"):  # one of ours: trained on its dataset's normalisation
        mean, std = dataset_info(argparse.Namespace(dataset=saved["dataset"]))[:2]
    else:
        cfg = getattr(teacher, "pretrained_cfg", None) or {}
        mean, std = cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD)
    channels = _first_conv_channels(teacher)
    label = name + (f" (encoder of {model_name})" if name != model_name else "") + f" from {checkpoint or 'timm hub'}"
    mean, std = (_stats_for(v, channels, f"teacher {name}'s {what}") for what, v in (("mean", mean), ("std", std)))
    return teacher, mean, std, label


class TeacherTarget:
    """Normalised images (N, C, H, W) -> LayerNorm-ed teacher features per student patch (N, L, dim). The images are
    re-normalised with the teacher's statistics (grey repeated to its channels) and resized to ``input_size``; the
    teacher runs in eval mode without gradients, under the caller's autocast."""

    name = "teacher"

    def __init__(self, teacher, *, mean, std, data_mean, data_std, input_size: int, grid, layer: int = -1,
                 loss: str = "smooth_l1", label: str = "", device="cpu"):
        if loss not in TEACHER_LOSSES:
            raise UserError(f"--target_loss must be one of {', '.join(TEACHER_LOSSES)}, got {loss!r}")
        if not hasattr(teacher, "forward_intermediates"):
            raise UserError(f"the teacher {type(teacher).__name__} cannot return intermediate features "
                             f"(timm's forward_intermediates); choose a timm ViT or CNN")
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.loss, self.layer, self.label = loss, layer, label
        self.input_size, self.grid = int(input_size), tuple(grid)
        self.channels = _first_conv_channels(teacher)
        self.data_mean, self.data_std, self.mean, self.std = (
            torch.tensor(v, device=device).view(1, -1, 1, 1) for v in (data_mean, data_std, mean, std))
        if self.data_mean.shape[1] not in (1, self.channels) and self.channels != 1:
            raise UserError(f"the teacher takes {self.channels}-channel images, the data has "
                             f"{self.data_mean.shape[1]} channels")
        # one probe forward: checks the layer index and tells the feature width (the decoder's output width)
        probe = torch.zeros(1, self.data_mean.shape[1], self.input_size, self.input_size, device=device)
        self.dim = self.features(probe).shape[1]

    def teacher_input(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs.float() * self.data_std + self.data_mean  # back to [0, 1] pixels
        if x.shape[1] != self.channels:
            x = x.mean(dim=1, keepdim=True) if self.channels == 1 else x.expand(-1, self.channels, -1, -1)
        x = (x - self.mean) / self.std
        if x.shape[-1] != self.input_size or x.shape[-2] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bicubic", align_corners=False)
        return x

    @torch.no_grad()
    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        """The chosen block's output at the patch positions (class and register tokens dropped), (N, D, h, w)."""
        try:
            (out,) = self.teacher.forward_intermediates(self.teacher_input(imgs), indices=[self.layer], norm=False,
                                                        stop_early=True, output_fmt="NCHW", intermediates_only=True)
        except (AssertionError, IndexError) as e:  # timm asserts on a block index out of range
            raise UserError(f"--teacher_layer {self.layer}: {e}") from None
        return out

    @torch.no_grad()
    def __call__(self, imgs: torch.Tensor) -> torch.Tensor:
        feats = self.features(imgs).float()
        if tuple(feats.shape[-2:]) != self.grid:  # another patch size or input size than the student's
            feats = F.interpolate(feats, size=self.grid, mode="bilinear", align_corners=False)
        feats = feats.flatten(2).transpose(1, 2)  # (N, L, D) in the student's raster order
        return F.layer_norm(feats, feats.shape[-1:], eps=1e-6)  # the models' LayerNorm eps

    def describe(self) -> str:
        block = "last block" if self.layer == -1 else f"block {self.layer}"
        return f"teacher {self.label}, {block}, {self.dim} features per patch, {self.loss} loss"


def target_name(args) -> str:
    """The target that ``--target`` / ``--norm_pix_loss`` ask for, once its other flags are checked to apply to it."""
    target = args.target
    if args.norm_pix_loss:  # the original's spelling of norm_pixel
        if target not in (None, "norm_pixel"):
            raise UserError(f"--norm_pix_loss means --target norm_pixel; it conflicts with --target {target}")
        target = "norm_pixel"
    target = target or "pixel"
    if target not in TARGETS:
        raise UserError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
    if target != "hog" and args.hog_cell is not None:
        raise UserError(f"--hog_cell applies to --target hog, not {target}")
    if target != "teacher":
        given = [f"--{flag}" for flag in TEACHER_FLAGS if getattr(args, flag, None) not in (None, False)]
        if given or args.teacher_layer != -1:
            raise UserError(f"{', '.join(given or ['--teacher_layer'])} applies to --target teacher, not {target}")
    return target


def build_target(settings: dict, student, data_mean, data_std, device="cpu"):
    """The generator for ``settings['target']`` (a run's arguments as a dict) fitted to ``student``'s patches, for
    ``student.set_target``; None for pixels."""
    target = settings.get("target") or ("norm_pixel" if settings.get("norm_pix_loss") else "pixel")
    patch_embed = student.patch_embed
    if target in ("pixel", "norm_pixel"):
        return None
    if target == "hog":
        patch_h, patch_w = patch_embed.patch_size
        if patch_h != patch_w:
            raise UserError(f"--target hog needs square patches, not {patch_h}x{patch_w}")
        return HOGTarget(patch_h, patch_embed.proj.in_channels, settings.get("hog_cell"))
    if target == "teacher":
        input_size = settings.get("teacher_input_size") or patch_embed.img_size[0]
        teacher, mean, std, label = load_teacher(settings.get("teacher_model"), settings.get("teacher_checkpoint"),
                                                 bool(settings.get("teacher_pretrained")), input_size)
        layer = settings.get("teacher_layer")
        return TeacherTarget(teacher, mean=mean, std=std, data_mean=data_mean, data_std=data_std, input_size=input_size,
                             grid=patch_embed.grid_size, layer=-1 if layer is None else int(layer),
                             loss=settings.get("target_loss") or "smooth_l1", label=label, device=device)
    raise UserError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
