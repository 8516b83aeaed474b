"""Export weights for other tools, from a checkpoint of this package (or anything ``--finetune`` reads):

    python export.py --checkpoint output_dir/checkpoint-last.pth --format hf --output_dir vit-mae-mine
    python export.py --checkpoint output_dir/checkpoint-last.pth --format timm --output_dir vit-mine
    python export.py --checkpoint output_dir/checkpoint-last.dcp --format pth --output_dir consolidated

``hf``: a ``transformers`` ViTMAEForPreTraining directory (ViTMAEModel for encoder-only weights): config.json and
model.safetensors, with the same outputs for the same ``noise``. ``timm``: the encoder (a fine-tuned classifier with
its head) as timm's model.safetensors and config.json (``pretrained_cfg``): ``timm.create_model("local-dir:DIR",
pretrained=True)``, or ``timm.create_model(ARCHITECTURE, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` with
config.json's model_args, gives our ``vit_*``'s outputs. ``pth``: ``checkpoint.pth`` in the original layout (model,
epoch, args), e.g. from an ``--fsdp`` run's sharded directory. ``--push_to_hub ORG/NAME`` uploads the directory."""
import argparse
import json
from pathlib import Path

import huggingface_hub
import safetensors.torch
import timm
import torch.nn as nn

from util import weights
from util.checkpoint import (PRETRAINING_ONLY, fit_state_dict, load_checkpoint_file, model_state_dict, save_atomic,
                             saved_args)
from util.cli import Parser, count, run
from util.datasets import dataset_info
from util.errors import UserError, one_line
from util.runtime import build_model


def get_args_parser():
    parser = Parser("Export weights as a Hugging Face ViTMAE or a timm ViT directory", add_help=True)
    parser.add_argument("--checkpoint", required=True, help="the weights (any name --finetune takes)")
    parser.add_argument("--output_dir", required=True, help="the directory to write")
    parser.add_argument("--format", choices=("hf", "timm", "pth"), default="hf",
                        help="hf: transformers' ViTMAE (a pretraining checkpoint); timm: timm's ViT (the encoder); "
                             "pth: the model in the original layout, one checkpoint.pth (consolidates --fsdp's shards)")
    parser.add_argument("--model", default=None, help="the checkpoint's model (default: from its training arguments)")
    parser.add_argument("--input_size", type=count(1), default=None, help="image size (default: the checkpoint's, 224)")
    parser.add_argument("--push_to_hub", default=None, metavar="ORG/NAME", help="upload the directory (online)")
    return parser


def export_hf(state, saved, name, img_size, in_chans, source):
    """(ViTMAE state dict, config) of a masked autoencoder's weights."""
    if not name.startswith("mae_"):
        raise UserError(f"--format hf writes a masked autoencoder; {source} holds a {name}: use --format timm")
    if saved.get("target") not in (None, "pixel", "norm_pixel"):
        raise UserError(f"{source} was pretrained with --target {saved['target']}; ViTMAE's decoder predicts pixels")
    model = build_model(name, img_size=img_size, in_chans=in_chans, norm_pix_loss=bool(saved.get("norm_pix_loss")))
    encoder_only = not any(key.startswith(PRETRAINING_ONLY) for key in state)  # e.g. mae_pretrain_vit_base.pth
    fit_state_dict(model, state, source, may_miss=PRETRAINING_ONLY if encoder_only else (), adapt=False, name=name)
    config = dict(architectures=["ViTMAEModel" if encoder_only else "ViTMAEForPreTraining"], model_type="vit_mae",
                  **weights.hf_config(model), norm_pix_loss=model.norm_pix_loss,
                  mask_ratio=saved.get("mask_ratio", 0.75))
    ours = {key: value for key, value in model.state_dict().items()
            if not (encoder_only and key.startswith(PRETRAINING_ONLY))}
    hf_state = weights.convert_layout(ours, to_hf=True, path=source)
    if encoder_only:  # ViTMAEModel's names have no "vit." prefix
        hf_state = {key.removeprefix("vit."): value for key, value in hf_state.items()}
    return hf_state, config


def export_timm(state, saved, name, img_size, in_chans, source):
    """timm's VisionTransformer holding the encoder (with a fine-tuned head, if any) and the data config."""
    name = name.removeprefix("mae_").split("_dec")[0]  # a pretraining checkpoint: its encoder
    if "head.1.weight" in state:  # a linear probe's BatchNorm + Linear: no timm head is like it
        print(f"note: {source} has a linear probe's head; exporting the encoder without it")
        state = {key: value for key, value in state.items() if not key.startswith("head.")}
    num_classes = state["head.weight"].shape[0] if "head.weight" in state else 0
    ours = build_model(name, img_size=img_size, in_chans=in_chans, num_classes=num_classes,
                       global_pool="fc_norm.weight" in state)
    fit_state_dict(ours, state, source, may_ignore=PRETRAINING_ONLY, adapt=False, name=name)
    architecture = f"{name}_{img_size}"
    if not timm.is_model(architecture):  # any ViT entry point: model_args set every size
        architecture = "vit_base_patch16_224"
    model_args = dict(img_size=img_size, patch_size=ours.patch_embed.patch_size[0], in_chans=in_chans,
                      embed_dim=ours.embed_dim, depth=len(ours.blocks), num_heads=ours.blocks[0].attn.num_heads,
                      num_classes=num_classes, global_pool=ours.global_pool,
                      fc_norm=not isinstance(ours.fc_norm, nn.Identity))
    model = timm.create_model(architecture, **model_args)
    model.load_state_dict(ours.state_dict())  # strict: timm's layout is ours
    dataset = saved.get("dataset") or ("fashion_mnist" if in_chans == 1 else "imagefolder")  # whose mean and std
    info = dataset_info(argparse.Namespace(dataset=dataset))
    data_config = dict(input_size=(in_chans, img_size, img_size), mean=info.mean, std=info.std,
                       interpolation="bicubic", crop_pct=224 / 256 if img_size <= 224 else 1.0)  # evaluation's crop
    return model, data_config


def push(folder, repo: str) -> None:
    try:
        huggingface_hub.create_repo(repo, exist_ok=True)
        huggingface_hub.upload_folder(repo_id=repo, folder_path=folder)
    except Exception as e:  # offline, not logged in, no permission
        raise UserError(f"cannot upload to {repo} ({type(e).__name__}: {one_line(e)[:160]}); the export is in "
                        f"{folder}: upload it where there is internet with `hf upload {repo} {folder}`") from None
    print(f"uploaded {folder} to https://huggingface.co/{repo}")


def main(args):
    checkpoint = load_checkpoint_file(args.checkpoint)
    state, saved = model_state_dict(checkpoint, args.checkpoint), saved_args(checkpoint)
    name = args.model or saved.get("model")
    if not name or "patch_embed.proj.weight" not in state:
        raise UserError(f"{args.checkpoint} names no model or holds no ViT; pass --model (e.g. mae_vit_base_patch16)")
    img_size = int(args.input_size or saved.get("input_size") or 224)
    in_chans = state["patch_embed.proj.weight"].shape[1]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.format == "pth":  # the original layout in one file, e.g. an --fsdp checkpoint directory consolidated
        save_atomic({"model": state, **{k: checkpoint[k] for k in ("epoch", "args") if k in checkpoint}},
                    out / "checkpoint.pth")
        print(f"wrote {out / 'checkpoint.pth'}")
        return
    if args.format == "hf":
        hf_state, config = export_hf(state, saved, name, img_size, in_chans, args.checkpoint)
        safetensors.torch.save_file(hf_state, out / "model.safetensors", metadata={"format": "pt"})
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    else:
        model, data_config = export_timm(state, saved, name, img_size, in_chans, args.checkpoint)
        timm.models.save_for_hf(model, out, safe_serialization=True, data_config=data_config)
    print(f"wrote {out / 'model.safetensors'} and {out / 'config.json'} ({args.format})")
    if args.push_to_hub:
        push(out, args.push_to_hub)


if __name__ == "__main__":
    run(main, get_args_parser().parse_args())
