"""Figures of MAE pretraining: the loss curve (and kNN accuracy), and grids with a row per image: original | masked |
reconstruction | the same with the visible patches pasted back; for HOG or teacher targets, a heat map of
cos(pred, target) instead."""
import json
import math
import os

import matplotlib
import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torchvision.utils import make_grid

from util import distributed
from util.datasets import build_dataset, dataset_info
from util.errors import UserError
from util.knn import K, TEMPERATURE

HEAT_MAP = "viridis"  # cosine similarity <= 0 dark purple, 1 yellow; never the grey of a removed patch
PAD = 2  # px of white around cells
STEP_LOG = "log_steps.txt"  # beside log.txt: a JSON line per training iteration (engine.append_step_log)


def fixed_noise(n: int, num_patches: int, seed: int = 0) -> torch.Tensor:
    """Masking noise (N, L) from a private generator: the same masks on every call, the global RNG untouched."""
    return torch.rand(n, num_patches, generator=torch.Generator().manual_seed(seed))


def patch_map(values: torch.Tensor, model, size) -> torch.Tensor:
    """Per-patch values (N, L) or (N, L, C) as images (N, C, H, W), every pixel of a patch holding its value."""
    per_patch = values.reshape(len(values), *model.patch_embed.grid_size, -1).permute(0, 3, 1, 2)
    return F.interpolate(per_patch.float(), size=tuple(size), mode="nearest")


def run_model(model, imgs: torch.Tensor, noise: torch.Tensor, mask_ratio: float, mean, std):
    """The grid's columns for ``imgs`` masked by ``noise``, each (N, C, H, W) in [0, 1] on the CPU, and a caption."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            on_device = imgs.to(next(model.parameters()).device)
            loss, pred, mask = model(on_device, mask_ratio=mask_ratio, noise=noise.to(on_device.device))
            target = model.forward_target(on_device).float().cpu() if model.target_fn is not None else None
    finally:
        for module, training in modes:
            module.training = training
    imgs, pred, mask = imgs.float().cpu(), pred.float().cpu(), mask.float().cpu()
    mean, std = torch.tensor(mean).view(1, -1, 1, 1), torch.tensor(std).view(1, -1, 1, 1)
    original = (imgs * std + mean).clamp(0.0, 1.0)
    removed = patch_map(mask, model, imgs.shape[-2:]).bool()
    masked = original.masked_fill(removed, 0.5)  # grey
    line = f"mask ratio {mask_ratio:g}: {int(mask[0].sum())} of {mask.shape[1]} patches removed, loss {loss:.4f}"
    if target is not None:
        cosine = F.cosine_similarity(pred, target, dim=-1)
        colours = torch.from_numpy(matplotlib.colormaps[HEAT_MAP](cosine.clamp(0, 1).numpy())[..., :3])
        heat = torch.where(removed, patch_map(colours, model, imgs.shape[-2:]), original)
        mean_cosine = float((cosine * mask).sum() / mask.sum().clamp(min=1))
        return [original, masked, heat], f"{line}, mean cosine on removed patches {mean_cosine:.3f}"
    if model.norm_pix_loss:  # the decoder predicts each patch normalised by its mean/std (eps of forward_target)
        patches = model.patchify(imgs)
        pred = pred * (patches.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5 + patches.mean(dim=-1, keepdim=True)
    reconstruction = (model.unpatchify(pred) * std + mean).clamp(0.0, 1.0)
    return [original, masked, reconstruction, torch.where(removed, reconstruction, original)], line


def draw(model, images, noise, ratios, mean, std, header: str, path=None) -> torch.Tensor:
    """The grid (3, H, W) in [0, 1] of ``images`` masked by ``noise`` at each mask ratio: a row per image and ratio.
    With ``path``, also a PNG of it (pixel for pixel) with column titles, a caption and, for several ratios, labels."""
    blocks, lines = zip(*(run_model(model, images, noise, ratio, mean, std) for ratio in ratios))
    cells = torch.stack([torch.cat(column).expand(-1, 3, -1, -1) for column in zip(*blocks)], dim=1)
    scale = max(1, math.ceil(96 / min(images.shape[-2:])))  # small images (28/32 px) enlarged to 96 px or more
    cells = F.interpolate(cells.flatten(0, 1), scale_factor=scale, mode="nearest")
    image = make_grid(cells, nrow=len(blocks[0]), padding=PAD, pad_value=1.0)
    if not path:
        return image
    titles, notes = ("original", "masked", "reconstruction", "+ visible patches"), []
    if model.target_fn is not None:
        titles = ("original", "masked", "cos(pred, target)")
        notes = [f"target: {model.target_fn.describe()}; no image is reconstructed",
                    f"heat map ({HEAT_MAP}): cosine similarity per removed patch, dark <= 0, yellow 1"]
    elif model.norm_pix_loss:
        notes = ["norm_pix_loss: prediction de-normalised with each patch's mean/std"]
    labels = [f"ratio {ratio:g}" for ratio in ratios for _ in images] if len(ratios) > 1 else []
    height, width = image.shape[1:]
    fig = Figure(figsize=(width / 100, height / 100), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(image.permute(1, 2, 0).numpy(), interpolation="nearest")
    ax.set_xticks([PAD / 2 + (i + 0.5) * (width - PAD) / len(titles) for i in range(len(titles))], titles)
    ax.set_yticks([PAD / 2 + (i + 0.5) * (height - PAD) / len(labels) for i in range(len(labels))], labels)
    ax.tick_params(length=0, labelsize=8, labeltop=True, labelbottom=False)
    ax.set_title("\n".join([header, *lines, *notes]), fontsize=8, loc="left")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, bbox_inches="tight", pad_inches=0.05)
    return image


class ReconstructionLogger:
    """The grid of the same held-out images with the same masks, on rank 0: ``OUTPUT_DIR/vis/epoch_XXXX.png``
    (``log`` returns its path, or None) and the TensorBoard image ``reconstruction``. The global RNG is untouched."""

    def __init__(self, args, num_images: int = 8, seed: int = 0):
        self.output_dir, self.mask_ratio, self.seed = args.output_dir, args.mask_ratio, seed
        self.writes = distributed.is_main_process() and bool(args.output_dir or args.log_dir)
        self.active = self.writes or getattr(args, "fsdp", False)  # a sharded model needs every rank in its forward
        if self.active:
            self.mean, self.std = dataset_info(args)[:2]
            try:
                dataset = build_dataset("val", args)  # evaluation transform
            except UserError:
                dataset = build_dataset("train", args)
            count = min(num_images, len(dataset))  # evenly spread: a class-sorted split shows several classes
            indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
            self.images = torch.stack([dataset[i][0] for i in indices])

    def log(self, model, epoch: int, log_writer=None):
        if not self.active:
            return None
        noise = fixed_noise(len(self.images), model.patch_embed.num_patches, self.seed)
        writes_file = self.output_dir and self.writes
        path = os.path.join(self.output_dir, "vis", f"epoch_{epoch:04d}.png") if writes_file else None
        image = draw(model, self.images, noise, [self.mask_ratio], self.mean, self.std, f"epoch {epoch}", path)
        if log_writer is not None:
            log_writer.add_image("reconstruction", image, epoch)
        return path


def read_log(log_txt_path, key: str = "epoch") -> list:
    """A log's JSON lines in order of ``key`` (``log.txt``: "epoch"; ``STEP_LOG``: "epoch" and "step"), the last
    line of a key winning (a resume writes it again); torn or other lines skipped."""
    keys = ("epoch", "step") if key == "step" else ("epoch",)
    by_key = {}
    with open(log_txt_path, encoding="utf-8") as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and all(isinstance(record.get(k), (int, float)) for k in keys):
                by_key[tuple(record[k] for k in keys)] = record
    return [by_key[k] for k in sorted(by_key)]


def plot_loss_curve(log_txt_path, out_png) -> str:
    """The training loss against epoch into ``out_png``: per iteration (faint) and smoothed when ``STEP_LOG`` lies
    beside ``log.txt``, else per epoch; the kNN accuracy per epoch beside it when logged. Returns the path."""
    records = read_log(log_txt_path)
    if not records:
        raise UserError(f"{log_txt_path} has no JSON lines with an epoch")
    step_log = os.path.join(os.path.dirname(os.path.abspath(log_txt_path)), STEP_LOG)
    steps = read_log(step_log, key="step") if os.path.isfile(step_log) else []
    knn = [(r["epoch"] + 1, r["knn_acc1"]) for r in records if "knn_acc1" in r]  # after the epoch
    fig = Figure(figsize=(8, 5.5), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2, width_ratios=(2, 1)) if knn else [fig.subplots()]
    if steps:
        x = np.array([s["epoch"] + s["step"] / s["steps"] for s in steps])
        loss = np.array([s["loss"] for s in steps])
        window = max(1, len(loss) // 50)  # a trailing mean over 2 % of the run
        axes[0].plot(x, loss, color="C0", alpha=0.25, linewidth=0.5, label="per iteration")
        axes[0].plot(x[window - 1:], np.convolve(loss, np.ones(window) / window, mode="valid"), color="C0",
                     label=f"running mean of {window}")
        for epoch in range(int(x[0]) + 1, math.ceil(x[-1])):
            axes[0].axvline(epoch, color="grey", linewidth=0.5, linestyle=":")
        axes[0].legend()
    else:  # a missing value is a gap
        axes[0].plot([r["epoch"] for r in records], [r.get("train_loss", math.nan) for r in records], marker=".")
    axes[0].set_ylabel("train_loss")
    if knn:
        axes[1].plot(*zip(*knn), marker="o", color="C1")
        axes[1].set_ylabel(f"kNN top-1 accuracy (%, k {K}, T {TEMPERATURE})")
    for ax in axes:
        ax.set_xlabel("epochs trained" if steps or ax is not axes[0] else "epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png)
    return str(out_png)
