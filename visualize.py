"""Reconstructions of a pretrained masked autoencoder on your own images, for one or several mask ratios:

    python visualize.py --checkpoint output_dir/checkpoint-last.pth --images photos/ --mask_ratio 0.5 0.75 0.9

Settings come from the checkpoint's training arguments (flags win); the original's released files have none: pass
``--model`` (and ``--norm_pix_loss`` for ``*_full.pth``). HOG/teacher targets get a heat map of cosine similarity."""
import argparse
import os

import torch
from PIL import Image
from torchvision import transforms

from util.checkpoint import load_checkpoint_file, load_pretrained, model_state_dict, saved_args
from util.cli import Parser, count, default_device, run
from util.datasets import BICUBIC, DATASETS, dataset_info, load_rgb_image
from util.errors import UserError
from util.figures import draw, fixed_noise
from util.runtime import build_model
from util.targets import build_target

IMAGE_EXTS = tuple(sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN))


def get_args_parser():
    parser = Parser("MAE reconstructions of images", add_help=True)
    parser.add_argument("--checkpoint", required=True, help="main_pretrain.py's, mae_visualize_*.pth, *_full.pth, "
                        "a ViTMAEForPreTraining directory or hf-hub:ORG/NAME")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files and/or directories")
    parser.add_argument("--mask_ratio", nargs="+", type=float, default=[0.75], metavar="R", help="ratios in [0, 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the masking noise (shared by all ratios)")
    parser.add_argument("--output", default="reconstruction.png", help="the PNG to write")
    parser.add_argument("--max_images", type=count(0), default=16, help="draw at most this many images (0: all)")
    g = parser.add_argument_group("model (default: from the checkpoint's training arguments)")
    g.add_argument("--model", default=None, help="mae_vit_* name; required for files without training arguments")
    g.add_argument("--input_size", type=count(1), default=None, help="image size (default 224)")
    g.add_argument("--norm_pix_loss", action="store_true", default=None, help="predicts per-patch normalised pixels")
    g.add_argument("--no_norm_pix_loss", action="store_false", dest="norm_pix_loss", default=None, help="plain pixels")
    g.add_argument("--dataset", default=None, choices=DATASETS, help="whose mean/std normalise the images")
    g.add_argument("--teacher_checkpoint", metavar="FILE", help="where a --target teacher's weights are now")
    g.add_argument("--device", default=default_device())
    return parser


def resolve_setting(name, flag_value, saved: dict, default):
    if flag_value is not None and saved.get(name) not in (None, flag_value):
        print(f"note: --{name} {flag_value} overrides the checkpoint's {saved[name]}")
    return next((value for value in (flag_value, saved.get(name)) if value is not None), default)


def collect_image_paths(specs, max_images: int = 0) -> list:
    paths = []
    for spec in specs:
        if os.path.isdir(spec):
            found = sorted(e.path for e in os.scandir(spec) if e.is_file() and e.name.lower().endswith(IMAGE_EXTS))
            if not found:
                folders = sorted(e.path for e in os.scandir(spec) if e.is_dir())
                hint = f"; it has sub-folders: pass those, e.g. {folders[0]}" if folders else ""
                raise UserError(f"no images found in {spec} (looked for .jpg, .png, ... files directly inside){hint}")
            paths += found
        elif os.path.isfile(spec):
            paths.append(spec)
        else:
            raise UserError(f"image {spec} does not exist")
    if max_images and len(paths) > max_images:
        print(f"note: drawing the first {max_images} of {len(paths)} images (--max_images)")
    return paths[:max_images or None]


def load_images(paths, input_size: int, in_chans: int, mean, std) -> torch.Tensor:
    transform = transforms.Compose([transforms.Resize(input_size, BICUBIC), transforms.CenterCrop(input_size),
                                    transforms.ToTensor(), transforms.Normalize(mean, std)])
    return torch.stack([transform(load_rgb_image(path).convert("L" if in_chans == 1 else "RGB")) for path in paths])


def main(args):
    if not all(0.0 <= ratio < 1.0 for ratio in args.mask_ratio):
        raise UserError(f"--mask_ratio must be in [0, 1), got {' '.join(map(str, args.mask_ratio))}")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA GPU is visible; use --device cpu")
    paths = collect_image_paths(args.images, args.max_images)  # before the (slow) checkpoint load

    checkpoint = load_checkpoint_file(args.checkpoint)
    state, saved = model_state_dict(checkpoint, args.checkpoint), saved_args(checkpoint)
    if not any(key.startswith("decoder_") for key in state):
        raise UserError(f"{args.checkpoint} has no decoder weights (encoder-only or fine-tuned); use a checkpoint "
                        f"of main_pretrain.py or a released mae_visualize_vit_*.pth / *_full.pth")
    model_name = resolve_setting("model", args.model, saved, None)
    if not model_name:
        raise UserError(f"{args.checkpoint} holds no training arguments naming its model; pass --model "
                        f"(e.g. --model mae_vit_large_patch16 for mae_visualize_vit_large.pth)")
    if not str(model_name).startswith("mae_"):
        raise UserError(f"reconstructions need a masked autoencoder (mae_vit_*), not {model_name}")
    input_size = int(resolve_setting("input_size", args.input_size, saved, 224))
    pixels = saved.get("target") in (None, "pixel", "norm_pixel")
    if not pixels and args.norm_pix_loss is not None:
        raise UserError(f"{args.checkpoint} was pretrained with --target {saved['target']}: its decoder predicts no "
                        f"pixels, so --norm_pix_loss / --no_norm_pix_loss do not apply")
    norm_pix = bool(resolve_setting("norm_pix_loss", args.norm_pix_loss, saved, False))
    target_name = ("norm_pixel" if norm_pix else "pixel") if pixels else saved["target"]
    dataset = resolve_setting("dataset", args.dataset, saved, "imagefolder")
    info = dataset_info(argparse.Namespace(dataset=dataset))
    in_chans = state["patch_embed.proj.weight"].shape[1] if "patch_embed.proj.weight" in state else info.in_chans
    if len(info.mean) != in_chans:
        raise UserError(f"{args.checkpoint} expects {in_chans}-channel images but --dataset {dataset} has "
                        f"{len(info.mean)}; pass --dataset {'fashion_mnist' if in_chans == 1 else 'imagefolder'}")
    if saved.get("norm_pix_loss") is None and args.norm_pix_loss is None and pixels:
        print("note: the checkpoint does not say whether it used norm_pix_loss; assuming not (--norm_pix_loss)")
    print(f"model {model_name}, {input_size} px, {in_chans} channel(s), target {target_name}, "
          f"norm_pix_loss {norm_pix}, {dataset} mean/std")

    model = build_model(model_name, img_size=input_size, in_chans=in_chans, norm_pix_loss=norm_pix).to(args.device)
    teacher = args.teacher_checkpoint or saved.get("teacher_checkpoint")  # where the recorded teacher is now
    target = build_target({**saved, "teacher_checkpoint": teacher}, model, info.mean, info.std, args.device)
    if target is not None:
        model.set_target(target)
        print(f"target: {target.describe()}")
    pred_rows = state["decoder_pred.weight"].shape[0] if "decoder_pred.weight" in state else None
    if pred_rows is not None and pred_rows != model.decoder_pred.out_features:
        why = (f"the recorded target gives {target.dim} (another teacher or --hog_cell?)" if target is not None else
               "the file does not say which target it was trained for; no reconstruction can be drawn")
        raise UserError(f"{args.checkpoint}: the decoder predicts {pred_rows} values per patch but {why}")
    load_pretrained(model, args.checkpoint, log=print)

    images = load_images(paths, input_size, in_chans, info.mean, info.std)
    noise = fixed_noise(len(images), model.patch_embed.num_patches, args.seed)  # one ordering for every ratio
    epoch = f", epoch {checkpoint['epoch']}" if isinstance(checkpoint.get("epoch"), int) else ""
    draw(model, images, noise, args.mask_ratio, info.mean, info.std,
         f"{os.path.basename(args.checkpoint)} ({model_name}{epoch}), masking noise seed {args.seed}", args.output)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
