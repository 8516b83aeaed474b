"""Pictures of what a masked autoencoder sees and predicts, and of how its training went.

* ``reconstruction_grid``: one row per image, four columns: original | masked input (removed patches grey) |
  reconstruction | reconstruction with the visible patches pasted back (those are the exact input pixels).
  The caption is written into the image, so a PNG explains itself.
* ``target_comparison_grid``: for models that predict other targets than pixels (HOG, teacher features;
  util/targets.py) there is no image to reconstruct: three columns, original | masked input | a heat map of the
  cosine similarity of prediction and target on each removed patch.
* ``ReconstructionLogger``: that grid on fixed held-out images with fixed masking noise during pretraining
  (``OUTPUT_DIR/vis/epoch_XXXX.png`` and TensorBoard), so epochs compare like for like.
* ``plot_loss_curve``: training loss and learning rate per epoch from ``log.txt``.

Everything is drawn with Pillow; matplotlib is not needed.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from util import distributed
from util.datasets import build_dataset, build_transform, dataset_info
from util.errors import UserError

NORM_PIX_NOTE = "prediction de-normalised with each patch's mean/std (norm_pix_loss)"
COLUMN_TITLES = ("original", "masked input", "reconstruction", "reconstruction + visible")
SIMILARITY_TITLES = ("original", "masked input", "prediction vs target (cosine)")
# heat-map colours of cosine similarity 0 (and below), 0.5 and 1: saturated, so they never pass for the grey of a
# removed patch or for the (often grey) image around them
SIMILARITY_RAMP = ((0.25, 0.0, 0.45), (0.85, 0.15, 0.15), (1.0, 0.9, 0.2))
SIMILARITY_NOTE = ("heat map: cosine similarity of predicted and true target per removed patch, purple <= 0, "
                   "red 0.5, yellow 1")
# must equal the eps of MaskedAutoencoderViT.target_patches, or de-normalising would not invert it
PATCH_STAT_EPS = 1.0e-6
# small images (CIFAR 32 px, Fashion-MNIST 28 px) are enlarged, nearest-neighbour, to at least this
MIN_CELL_SIZE = 96
MARGIN = 6  # px around the figure
GAP = 4  # px between cells
MASK_GREY = 0.5  # display value of removed patches
WHITE = (255, 255, 255)
BLACK = (0, 0, 0)


# ------------------------------------------------------------------ pure helpers
def fixed_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise (N, L) from a private generator: the same masks on every call, and the global RNG
    stream (which exact resume replays) is left untouched."""
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, num_patches, generator=generator)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module under DDP (``.module``) and torch.compile (``._orig_mod``) wrappers: running only rank 0
    through DDP could hang on a collective, and a compiled model would recompile for eval mode."""
    while True:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def denormalize_patches(pred: torch.Tensor, target_pixels: torch.Tensor) -> torch.Tensor:
    """Undo norm_pix_loss: predictions of per-patch normalised pixels (N, L, D) back to pixels, with the mean
    and std of each target patch (``target_pixels`` = ``model.patchify(imgs)``), computed as
    ``target_patches`` computes them (unbiased variance, eps 1e-6)."""
    mean = target_pixels.mean(dim=-1, keepdim=True)
    var = target_pixels.var(dim=-1, keepdim=True)
    return pred * (var + PATCH_STAT_EPS) ** 0.5 + mean


def mask_to_image(mask: torch.Tensor, model) -> torch.Tensor:
    """The patch mask (N, L; 1 = removed) as a pixel mask (N, 1, H, W) on the model's patch grid."""
    p, q = model.patch_size
    return model.unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * q))


def paste_visible(pred_imgs: torch.Tensor, imgs: torch.Tensor, mask_img: torch.Tensor) -> torch.Tensor:
    """The reconstruction in removed patches, the input elsewhere; ``where`` (not a blend) keeps the visible
    pixels bit-identical to the input."""
    return torch.where(mask_img.bool(), pred_imgs, imgs)


def to_display(imgs: torch.Tensor, mean, std) -> torch.Tensor:
    """Undo the dataset normalisation and clamp to [0, 1] for drawing."""
    mean = torch.as_tensor(mean, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=imgs.dtype, device=imgs.device).view(1, -1, 1, 1)
    if mean.shape[1] != imgs.shape[1]:
        raise ValueError(f"{mean.shape[1]} channel statistics for images with {imgs.shape[1]} channels")
    # a separate multiply and add (no fused addcmul) so equal inputs give bit-equal outputs in every column
    return (imgs * std + mean).clamp(0.0, 1.0)


def to_rgb_uint8(imgs: torch.Tensor, scale: int = 1) -> np.ndarray:
    """(N, C, H, W) in [0, 1] -> (N, H*scale, W*scale, 3) uint8; grey images become grey RGB, enlargement is
    nearest-neighbour by pixel repetition, so every source pixel maps to an exact block."""
    if imgs.shape[1] == 1:
        imgs = imgs.expand(-1, 3, -1, -1)
    elif imgs.shape[1] != 3:
        raise ValueError(f"cannot draw images with {imgs.shape[1]} channels (1 or 3)")
    pixels = (imgs * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return pixels.repeat(scale, axis=1).repeat(scale, axis=2)


# ------------------------------------------------------------------ running the model
@dataclass
class Reconstruction:
    """What the model made of a batch; image tensors are on the CPU in the input's normalised space."""
    mask: torch.Tensor  # (N, L), 1 = removed
    mask_img: torch.Tensor  # (N, 1, H, W)
    pred_imgs: torch.Tensor  # (N, C, H, W), norm_pix already undone
    pasted: torch.Tensor  # (N, C, H, W), visible patches = input
    loss: float
    mask_ratio: float
    norm_pix: bool

    @property
    def num_patches(self) -> int:
        return self.mask.shape[1]

    @property
    def num_removed(self) -> int:
        return int(self.mask[0].sum().item())


@contextlib.contextmanager
def evaluating(model):
    """Eval mode and no gradients inside; afterwards each submodule's own train/eval mode again, so a partly
    frozen model comes back exactly as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def predicts_pixels(model) -> bool:
    p, q = model.patch_size
    return model.decoder_pred.out_features == p * q * model.in_chans


def reconstruct(model, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> Reconstruction:
    """Run ``model`` in eval mode without gradients on ``imgs`` (normalised, N x C x H x W) with the given
    masking ``noise`` (N, L); the model's train/eval mode is restored afterwards."""
    model = unwrap_model(model)
    if not predicts_pixels(model):
        raise ValueError(f"the decoder predicts {model.decoder_pred.out_features} values per patch, not pixels: "
                         f"draw it with target_comparison_grid and its target")
    device = next(model.parameters()).device
    imgs = imgs.detach().float().cpu()
    with evaluating(model):
        on_device = imgs.to(device)
        loss, pred, mask = model(on_device, mask_ratio=mask_ratio, noise=noise.to(device))
        pred = pred.float()
        if model.norm_pix_loss:
            pred = denormalize_patches(pred, model.patchify(on_device))
        pred_imgs = model.unpatchify(pred).cpu()
        mask = mask.float().cpu()
        mask_img = mask_to_image(mask, model)
    return Reconstruction(mask=mask, mask_img=mask_img, pred_imgs=pred_imgs,
                          pasted=paste_visible(pred_imgs, imgs, mask_img), loss=float(loss),
                          mask_ratio=mask_ratio, norm_pix=bool(model.norm_pix_loss))


@dataclass
class TargetComparison:
    """How close a non-pixel model's predictions are to their targets; tensors on the CPU."""
    mask: torch.Tensor  # (N, L), 1 = removed
    mask_img: torch.Tensor  # (N, 1, H, W)
    similarity: torch.Tensor  # (N, L) cosine similarity of prediction and target per patch
    heat_img: torch.Tensor  # (N, 3, H, W) in [0, 1], each patch in the colour of its similarity
    loss: float
    mask_ratio: float
    target: str  # what was predicted, in words

    num_patches = Reconstruction.num_patches
    num_removed = Reconstruction.num_removed

    @property
    def removed_similarity(self) -> float:
        """Mean similarity over the removed patches (the ones the loss counts)."""
        return float((self.similarity * self.mask).sum() / self.mask.sum().clamp(min=1))


def similarity_colours(similarity: torch.Tensor) -> torch.Tensor:
    """(...) cosine similarities -> (..., 3) RGB in [0, 1] along SIMILARITY_RAMP (values below 0 as 0)."""
    ramp = torch.tensor(SIMILARITY_RAMP, dtype=torch.float32)
    position = similarity.float().clamp(0.0, 1.0) * (len(ramp) - 1)
    low = position.floor().long().clamp(max=len(ramp) - 2)
    frac = (position - low).unsqueeze(-1)
    return ramp[low] * (1 - frac) + ramp[low + 1] * frac


def compare_with_target(model, target, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float) -> TargetComparison:
    """Run a non-pixel ``model`` like :func:`reconstruct` and compare its predictions with ``target(imgs)`` (a
    generator of util/targets.py) patch by patch."""

    model = unwrap_model(model)
    device = next(model.parameters()).device
    imgs = imgs.detach().float().cpu()
    with evaluating(model):
        on_device = imgs.to(device)
        wanted = target(on_device)
        loss, pred, mask = model(on_device, mask_ratio=mask_ratio, noise=noise.to(device))
        similarity = F.cosine_similarity(pred.float(), wanted.float(), dim=-1, eps=1e-8).cpu()
    mask = mask.float().cpu()
    p, q = model.patch_size
    colours = similarity_colours(similarity)  # (N, L, 3), one colour per patch, spread over its pixels
    heat = model.unpatchify(colours.unsqueeze(2).expand(-1, -1, p * q, -1).reshape(*similarity.shape, -1))
    describe = getattr(target, "describe", None)
    return TargetComparison(mask=mask, mask_img=mask_to_image(mask, model), similarity=similarity, heat_img=heat,
                            loss=float(loss), mask_ratio=mask_ratio, target=describe() if describe else str(target))


# ------------------------------------------------------------------ drawing a figure
@dataclass
class Panel:
    """A block of rows under one title: ``columns`` are (N, C, H, W) tensors in [0, 1], one per column."""
    title: str
    column_titles: tuple
    columns: list


@dataclass
class Figure:
    image: np.ndarray  # (H, W, 3) uint8
    cells: list  # cells[panel][row][column] = (top, left) of that cell in ``image``
    cell_size: tuple  # (height, width) of a cell in px
    scale: int  # enlargement factor of the source pixels


def reconstruction_panel(rec: Reconstruction, imgs: torch.Tensor, mean, std, title: str = "") -> Panel:
    """The four columns of ``rec`` in display space."""
    imgs = imgs.detach().float().cpu()
    original = to_display(imgs, mean, std)
    masked = torch.where(rec.mask_img.bool(), torch.full_like(original, MASK_GREY), original)
    return Panel(title, COLUMN_TITLES,
                 [original, masked, to_display(rec.pred_imgs, mean, std), to_display(rec.pasted, mean, std)])


def reconstruction_caption(rec: Reconstruction, title: str = "") -> str:
    parts = [title] if title else []
    parts.append(f"mask ratio {rec.mask_ratio:g}: {rec.num_removed} of {rec.num_patches} patches removed (grey), "
                 f"loss {rec.loss:.4f}")
    parts.append("last column: visible patches are the input pixels")
    if rec.norm_pix:
        parts.append(NORM_PIX_NOTE)
    return "; ".join(parts)


def similarity_panel(cmp: TargetComparison, imgs: torch.Tensor, mean, std, title: str = "") -> Panel:
    """original | masked input | the heat map on the removed patches (the input on the visible ones)."""
    original = to_display(imgs.detach().float().cpu(), mean, std)
    removed = cmp.mask_img.bool()
    masked = torch.where(removed, torch.full_like(original, MASK_GREY), original)
    heat = torch.where(removed, cmp.heat_img, original.expand(-1, 3, -1, -1))
    return Panel(title, SIMILARITY_TITLES, [original, masked, heat])


def comparison_caption(cmp: TargetComparison, title: str = "") -> str:
    parts = [title] if title else []
    parts.append(f"mask ratio {cmp.mask_ratio:g}: {cmp.num_removed} of {cmp.num_patches} patches removed (grey), "
                 f"loss {cmp.loss:.4f}, mean cosine similarity on removed patches {cmp.removed_similarity:.3f}")
    parts.append(f"target: {cmp.target}, not pixels, so no image is reconstructed")
    parts.append(SIMILARITY_NOTE)
    return "; ".join(parts)


def target_comparison_grid(model, target, imgs, noise, mean, std, mask_ratio: float = 0.75, title: str = ""):
    """:func:`reconstruction_grid` for models that predict ``target`` (util/targets.py) instead of pixels."""
    cmp = compare_with_target(model, target, imgs, noise, mask_ratio)
    caption = comparison_caption(cmp, title)
    return render_figure(caption, [similarity_panel(cmp, imgs, mean, std)]).image, caption


def reconstruction_grid(model, imgs, noise, mean, std, mask_ratio: float = 0.75, title: str = "", target=None):
    """Reconstruct ``imgs`` (normalised with ``mean``/``std``) with fixed masking ``noise`` and draw the grid;
    with a non-pixel ``target`` generator, the similarity grid of :func:`target_comparison_grid` instead.

    Returns ``(image, caption)``: an (H, W, 3) uint8 array with the caption and column titles drawn in, and
    the caption as text.
    """
    if target is not None:
        return target_comparison_grid(model, target, imgs, noise, mean, std, mask_ratio, title)
    rec = reconstruct(model, imgs, noise, mask_ratio)
    caption = reconstruction_caption(rec, title)
    return render_figure(caption, [reconstruction_panel(rec, imgs, mean, std)]).image, caption


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # scalable font when Pillow has FreeType
    except (TypeError, OSError, ImportError):  # older Pillow or no FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _line_height(font) -> int:
    return font.getbbox("Hgjy|")[3] + 3


def wrap_text(text: str, font, max_width: float) -> list:
    """Greedy word wrap to ``max_width`` px (a single word longer than that gets a line of its own)."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split():
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > max_width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def render_figure(caption: str, panels: list) -> Figure:
    """Caption strip, then per panel its title, the column titles and one row of cells per image."""
    n_rows, _, height, width = panels[0].columns[0].shape
    n_cols = len(panels[0].columns)
    scale = max(1, math.ceil(MIN_CELL_SIZE / min(height, width)))
    cell_h, cell_w = height * scale, width * scale
    font = _font(min(18, max(11, cell_w // 8)))
    line_h = _line_height(font)
    fig_w = 2 * MARGIN + n_cols * cell_w + (n_cols - 1) * GAP
    text_w = fig_w - 2 * MARGIN

    def column_left(col):
        return MARGIN + col * (cell_w + GAP)

    # first the layout (text positions and cell corners), then one canvas of the final size
    texts, cells, rules = [], [], []
    y = MARGIN
    for line in wrap_text(caption, font, text_w) if caption else []:
        texts.append((MARGIN, y, line))
        y += line_h
    for index, panel in enumerate(panels):
        if index or caption:
            rules.append(y + GAP // 2)  # a thin line between blocks
            y += GAP + 2
        for line in wrap_text(panel.title, font, text_w) if panel.title else []:
            texts.append((MARGIN, y, line))
            y += line_h
        titles = [wrap_text(t, font, cell_w) for t in panel.column_titles]
        for col, lines in enumerate(titles):
            for i, line in enumerate(lines):
                texts.append((column_left(col) + (cell_w - font.getlength(line)) / 2, y + i * line_h, line))
        y += max((len(lines) for lines in titles), default=0) * line_h
        panel_cells = []
        for _ in range(n_rows):
            panel_cells.append([(y, column_left(col)) for col in range(n_cols)])
            y += cell_h + GAP
        cells.append(panel_cells)
    fig_h = y - GAP + MARGIN

    canvas = np.full((fig_h, fig_w, 3), 255, dtype=np.uint8)
    for panel, panel_cells in zip(panels, cells):
        for col, column in enumerate(panel.columns):
            pixels = to_rgb_uint8(column, scale)
            for row, corners in enumerate(panel_cells):
                top, left = corners[col]
                canvas[top:top + cell_h, left:left + cell_w] = pixels[row]
    image = Image.fromarray(canvas)
    draw = ImageDraw.Draw(image)
    for rule_y in rules:
        draw.line([(MARGIN, rule_y), (fig_w - MARGIN, rule_y)], fill=(160, 160, 160), width=1)
    for x, y, line in texts:
        draw.text((x, y), line, fill=BLACK, font=font)
    return Figure(np.asarray(image).copy(), cells, (cell_h, cell_w), scale)


def save_png(image: np.ndarray, path) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(image).save(path)


# ------------------------------------------------------------------ during pretraining
class ReconstructionLogger:
    """Draws reconstructions of the same held-out images with the same masks after chosen epochs of a pretraining
    run: ``OUTPUT_DIR/vis/epoch_XXXX.png`` and the TensorBoard image ``reconstruction``, on rank 0 only. It restores
    the model's train/eval mode and leaves the global RNG state as it was. A model with a non-pixel target
    (util/targets.py) gets the similarity grid instead."""

    def __init__(self, args, num_images: int = 8, seed: int = 0):
        self.output_dir, self.mask_ratio, self.seed = args.output_dir, args.mask_ratio, seed
        self.active = distributed.is_main_process() and bool(args.output_dir or args.log_dir)
        if self.active:
            info = dataset_info(args)
            self.images, self.mean, self.std = held_out_images(args, num_images), info.mean, info.std

    def log(self, model, epoch: int, log_writer=None):
        """Returns the PNG path written (None when none was)."""
        if not self.active:
            return None
        device = next(model.parameters()).device
        cuda_devices = [device.index if device.index is not None else torch.cuda.current_device()] \
            if device.type == "cuda" else []
        noise = fixed_noise(len(self.images), model.patch_embed.num_patches, self.seed)  # the same masks every epoch
        # the forward with given noise draws no random numbers; fork_rng guarantees it stays so
        with torch.random.fork_rng(devices=cuda_devices):
            image, _ = reconstruction_grid(model, self.images, noise, self.mean, self.std, self.mask_ratio,
                                           title=f"epoch {epoch}", target=model.target_fn)
        path = None
        if self.output_dir:
            path = os.path.join(self.output_dir, "vis", f"epoch_{epoch:04d}.png")
            save_png(image, path)
        if log_writer is not None:
            log_writer.add_image("reconstruction", torch.from_numpy(image).permute(2, 0, 1), epoch)  # uint8 CHW
        return path


def held_out_images(args, num_images: int = 8) -> torch.Tensor:
    """``num_images`` images spread evenly over the validation split (the training split when there is
    none), with the deterministic evaluation transform, stacked (N, C, H, W)."""
    transform = build_transform("eval", args)
    try:
        dataset = build_dataset("val", args, transform)
    except UserError:
        dataset = build_dataset("train", args, transform)
    if len(dataset) == 0:
        raise UserError("no images to draw reconstructions of: the dataset is empty")
    count = min(num_images, len(dataset))
    # evenly spaced, not the first k: class-sorted splits would otherwise show a single class
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    return torch.stack([dataset[i][0] for i in indices])


# ------------------------------------------------------------------ loss curve
SERIES = (("train_loss", "training loss", (31, 119, 180)), ("train_lr", "learning rate", (230, 110, 0)))


def read_log(log_txt_path) -> list:
    """The JSON lines of ``log.txt`` sorted by epoch, one per epoch: the last line written for an epoch wins
    (a run resumed from an earlier checkpoint writes it again); torn or non-JSON lines are skipped."""
    by_epoch = {}
    try:
        with open(log_txt_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict) and isinstance(record.get("epoch"), (int, float)):
                    by_epoch[record["epoch"]] = record
    except OSError as e:
        raise UserError(f"cannot read {log_txt_path}: {e.strerror or e}") from None
    return [by_epoch[epoch] for epoch in sorted(by_epoch)]


def nice_ticks(low: float, high: float, max_ticks: int = 6, integer: bool = False):
    """Round tick values (1, 2 or 5 times a power of ten) covering [low, high]; returns (low, high, ticks,
    step) with the range widened when it is a single value."""
    if high <= low:
        pad = 0.5 if integer else (abs(low) * 0.1 or 1.0)
        low, high = low - pad, high + pad
    raw = (high - low) / max_ticks
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    if integer:
        step = max(1, round(step))
    first = math.ceil(low / step - 1e-9)
    ticks = [i * step for i in range(first, math.floor(high / step + 1e-9) + 1)]
    return low, high, ticks, step


def format_ticks(ticks, step) -> list:
    """Labels with as many decimals as the step needs; scientific notation for very small or large values."""
    largest = max((abs(t) for t in ticks), default=0)
    step_exp = math.floor(math.log10(step) + 1e-9)
    if largest == 0 or -3 <= math.floor(math.log10(largest)) < 6:
        return [f"{t:.{max(0, -step_exp)}f}" for t in ticks]
    digits = max(0, math.floor(math.log10(largest)) - step_exp)
    return [f"{t:.{digits}e}" for t in ticks]


def plot_loss_curve(log_txt_path, out_png, width: int = 800, panel_height: int = 250) -> str:
    """Draw training loss and learning rate against epoch from ``log.txt`` (JSON lines with ``epoch``,
    ``train_loss``, ``train_lr``) into ``out_png``: one panel per series on a shared epoch axis. Returns the
    path written; raises UserError when the log has no usable line."""
    records = read_log(log_txt_path)
    series = []
    for key, label, colour in SERIES:
        points = [(float(r["epoch"]), float(r[key])) for r in records
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            series.append((key, label, colour, points))
    if not series:
        raise UserError(f"{log_txt_path} has no lines with epoch and a finite train_loss or train_lr")

    font = _font(13)
    line_h = _line_height(font)
    left, right = 80, 20  # room for y tick labels
    epochs = [x for *_, points in series for x, _ in points]
    x_low, x_high, x_ticks, x_step = nice_ticks(min(epochs), max(epochs), 10, integer=True)
    x_pad = 0.02 * (x_high - x_low)  # keeps the first and last points off the frame
    x_low, x_high = x_low - x_pad, x_high + x_pad
    top = MARGIN + line_h + 4
    block_height = line_h + 4 + panel_height + line_h + 8  # title, frame, x tick labels
    height = top + len(series) * block_height + line_h + MARGIN
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    count = len(records)
    draw.text((MARGIN, MARGIN), f"{os.path.basename(str(log_txt_path))}: {count} epoch{'s' * (count != 1)} "
              f"({int(min(epochs))} to {int(max(epochs))})", fill=BLACK, font=font)

    def x_px(x):
        return left + (x - x_low) / (x_high - x_low) * (width - left - right)

    for key, label, colour, points in series:
        draw.text((left, top), f"{label} per epoch", fill=BLACK, font=font)
        frame_top, frame_bottom = top + line_h + 4, top + line_h + 4 + panel_height
        values = [v for _, v in points]
        span = (max(values) - min(values)) or abs(values[0]) * 0.1 or 1.0
        y_low, y_high, y_ticks, y_step = nice_ticks(min(values) - 0.05 * span, max(values) + 0.05 * span)

        def y_px(v):
            return frame_bottom - (v - y_low) / (y_high - y_low) * panel_height

        for tick, text in zip(y_ticks, format_ticks(y_ticks, y_step)):
            y = y_px(tick)
            draw.line([(left, y), (width - right, y)], fill=(225, 225, 225))
            draw.line([(left - 4, y), (left, y)], fill=BLACK)
            draw.text((left - 6 - font.getlength(text), y - line_h / 2), text, fill=BLACK, font=font)
        for tick, text in zip(x_ticks, format_ticks(x_ticks, x_step)):
            x = x_px(tick)
            draw.line([(x, frame_top), (x, frame_bottom)], fill=(235, 235, 235))
            draw.line([(x, frame_bottom), (x, frame_bottom + 4)], fill=BLACK)
            draw.text((x - font.getlength(text) / 2, frame_bottom + 5), text, fill=BLACK, font=font)
        draw.rectangle([left, frame_top, width - right, frame_bottom], outline=BLACK)
        xy = [(x_px(x), y_px(v)) for x, v in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2, joint="curve")
        if len(xy) <= 60:  # markers while they stay distinguishable; they make a single epoch visible
            for x, y in xy:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        # legend right-aligned above the frame, where it can hide no data
        legend_x = width - right - font.getlength(key) - 30
        draw.line([(legend_x, top + line_h / 2), (legend_x + 22, top + line_h / 2)], fill=colour, width=2)
        draw.text((legend_x + 28, top), key, fill=BLACK, font=font)
        top = frame_bottom + line_h + 8
    draw.text(((left + width - right - font.getlength("epoch")) / 2, top), "epoch", fill=BLACK, font=font)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    image.save(out_png)
    return str(out_png)
