"""Weights named the ways users find them, read into the original layout (the package's own): files (``.pth``,
``.bin``, ``.safetensors``; timm's ViT weights have the original layout already), model directories (``config.json``
and ``model.safetensors`` or ``pytorch_model.bin``) of timm or of Hugging Face's ViTMAE (``ViTMAEModel`` or
``ViTMAEForPreTraining``), and hub names (``hf-hub:ORG/NAME``, ``timm/NAME``) fetched into huggingface_hub's cache.
``HF_TABLE`` is the one conversion between the original's names and ViTMAE's, read in both directions."""
import json
import os
import re

import huggingface_hub
import torch

from util.errors import UserError, one_line

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in a model directory, in order of preference
HF_MARKER = "embeddings.patch_embeddings.projection.weight"  # a key only ViTMAE's layout has
QKV = ("query", "key", "value")  # {qkv}: ViTMAE's three projections, our fused qkv stacked along dim 0

# (ours, ViTMAEForPreTraining's) names; {i}: a block, {w}: weight or bias
_BLOCK = [("norm1.{w}", "layernorm_before.{w}"), ("attn.qkv.{w}", "attention.attention.{qkv}.{w}"),
          ("attn.proj.{w}", "attention.output.dense.{w}"), ("norm2.{w}", "layernorm_after.{w}"),
          ("mlp.fc1.{w}", "intermediate.dense.{w}"), ("mlp.fc2.{w}", "output.dense.{w}")]
HF_TABLE = [("cls_token", "vit.embeddings.cls_token"), ("pos_embed", "vit.embeddings.position_embeddings"),
            ("patch_embed.proj.{w}", "vit.embeddings.patch_embeddings.projection.{w}"),
            *[(f"blocks.{{i}}.{ours}", f"vit.encoder.layer.{{i}}.{hf}") for ours, hf in _BLOCK],
            ("norm.{w}", "vit.layernorm.{w}"),
            ("decoder_embed.{w}", "decoder.decoder_embed.{w}"), ("mask_token", "decoder.mask_token"),
            ("decoder_pos_embed", "decoder.decoder_pos_embed"),  # both sides store the fixed sin-cos tables
            *[(f"decoder_blocks.{{i}}.{ours}", f"decoder.decoder_layers.{{i}}.{hf}") for ours, hf in _BLOCK],
            ("decoder_norm.{w}", "decoder.decoder_norm.{w}"), ("decoder_pred.{w}", "decoder.decoder_pred.{w}")]
# ViTMAEConfig fields that must equal the model's, and what to call them in an error
CHECKED = dict(hidden_size="width", num_hidden_layers="depth", num_attention_heads="heads",
               intermediate_size="MLP width", patch_size="patch size", num_channels="channels", qkv_bias="qkv bias",
               hidden_act="activation", decoder_hidden_size="decoder width", decoder_num_hidden_layers="decoder depth",
               decoder_num_attention_heads="decoder heads", decoder_intermediate_size="decoder MLP width")


def resolve(name: str) -> str:
    """A local path for ``name``: hub names (``hf-hub:ORG/NAME[@REVISION]``, ``timm/NAME`` where no such path
    exists) are downloaded into huggingface_hub's cache (offline: found there); paths are returned as they are."""
    if not name.startswith("hf-hub:") and not (name.startswith("timm/") and not os.path.exists(name)):
        return name
    repo, _, revision = name.removeprefix("hf-hub:").partition("@")
    try:
        path = huggingface_hub.snapshot_download(repo, revision=revision or None,
                                                 allow_patterns=["config.json", WEIGHT_FILES[0]])
        if not os.path.isfile(os.path.join(path, WEIGHT_FILES[0])):  # a repository without safetensors
            path = huggingface_hub.snapshot_download(repo, revision=revision or None, allow_patterns=[WEIGHT_FILES[1]])
    except Exception as e:  # offline and not cached, no such repository, no permission
        raise UserError(f"cannot download {name} ({type(e).__name__}; offline?): download it where there is internet "
                        f"(`hf download {repo} --local-dir DIR`) and pass DIR instead") from None
    return path


def locate(path: str):
    """``(weights file, config or None)``: a file is its own weights; a model directory holds both."""
    if not os.path.isdir(path):
        return path, None
    files = [os.path.join(path, name) for name in WEIGHT_FILES if os.path.isfile(os.path.join(path, name))]
    if not files or not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is no model directory: it needs config.json and {' or '.join(WEIGHT_FILES)}")
    try:
        with open(os.path.join(path, "config.json")) as f:
            return files[0], json.load(f)
    except ValueError as e:
        raise UserError(f"{path}/config.json is not valid JSON: {one_line(e)}") from None


def to_original_layout(checkpoint, config, path) -> dict:
    """``checkpoint`` in the original layout. ViTMAE weights are renamed, their config's image size, norm_pix_loss
    and mask ratio become training arguments and the config is kept (``hf_config``) for ``check_architecture``; a
    timm directory's config names the model; everything else is returned as it is."""
    config = config or {}
    if "architecture" in config:  # timm's: architecture (and tag) name the model, e.g. for a teacher
        tag = config.get("pretrained_cfg", {}).get("tag")
        return {"model": checkpoint.get("model", checkpoint), "args": {"model": config["architecture"]
                                                                       + (f".{tag}" if tag else "")}}
    if config.get("model_type", "vit_mae") != "vit_mae":
        raise UserError(f"{path} holds a Hugging Face {config['model_type']} model; only ViTMAE (vit_mae) converts")
    state = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state, dict) or not any(key.endswith(HF_MARKER) for key in state):
        return checkpoint
    # ViTMAEModel saves without the "vit." prefix; transformers 5 saves decoder layers as decoder_encoder.layer
    state = {(key if key.startswith(("vit.", "decoder.")) else "vit." + key)
             .replace("decoder.decoder_encoder.layer.", "decoder.decoder_layers."): value
             for key, value in state.items()}
    args = {"input_size": config["image_size"], "norm_pix_loss": config.get("norm_pix_loss", False),
            "mask_ratio": config.get("mask_ratio", 0.75)} if "image_size" in config else {}
    return {"model": convert_layout(state, to_hf=False, path=path), "args": args, "hf_config": config}


def _pattern(template: str):
    return re.compile(template.replace(".", r"\.").format(i=r"(?P<i>\d+)", w="(?P<w>weight|bias)",
                                                          qkv="(?P<qkv>query|key|value)"))


def convert_layout(state: dict, to_hf: bool, path="weights") -> dict:
    """``state`` renamed with ``HF_TABLE``, from ours to ViTMAEForPreTraining's (``to_hf``) or back; qkv is split
    into query, key and value, or joined. A key the table does not know is an error."""
    source, dest = (0, 1) if to_hf else (1, 0)
    rows = [(_pattern(row[source]), row) for row in HF_TABLE]
    out = {}
    for key, value in state.items():
        match, row = next(((m, row) for pattern, row in rows if (m := pattern.fullmatch(key))), (None, None))
        if match is None:
            raise UserError(f"{path}: {key} is no weight of {'MAE' if to_hf else 'ViTMAE'} (unknown key)")
        fields = match.groupdict()
        if "{qkv}" not in row[1]:
            out[row[dest].format(**fields)] = value
        elif to_hf:
            out.update({row[1].format(qkv=part, **fields): chunk.clone() for part, chunk in zip(QKV, value.chunk(3))})
        elif fields.pop("qkv") == "query":  # joined once, at the query
            names = [row[1].format(qkv=part, **fields) for part in QKV]
            if any(name not in state for name in names):
                raise UserError(f"{path}: {key} comes without all of {', '.join(names)}")
            out[row[0].format(**fields)] = torch.cat([state[name] for name in names])
    return out


def hf_config(model) -> dict:
    """The ViTMAEConfig fields that describe ``model`` (a ``mae_vit_*`` model or a ``vit_*`` encoder)."""
    block, embed = model.blocks[0], model.patch_embed
    config = dict(hidden_size=embed.proj.out_channels, num_hidden_layers=len(model.blocks),
                  num_attention_heads=block.attn.num_heads, intermediate_size=block.mlp.fc1.out_features,
                  hidden_act="gelu", qkv_bias=block.attn.qkv.bias is not None, layer_norm_eps=block.norm1.eps,
                  image_size=embed.img_size[0], patch_size=embed.patch_size[0], num_channels=embed.proj.in_channels)
    if hasattr(model, "decoder_blocks"):
        decoder = model.decoder_blocks[0]
        config.update(decoder_hidden_size=model.decoder_embed.out_features,
                      decoder_num_hidden_layers=len(model.decoder_blocks),
                      decoder_num_attention_heads=decoder.attn.num_heads,
                      decoder_intermediate_size=decoder.mlp.fc1.out_features)
    return config


def check_architecture(checkpoint, model, path, log=print) -> None:
    """For weights converted from ViTMAE: one UserError naming every way its config differs from ``model`` (the
    decoder's only where both have one). Image sizes may differ: position tables are resampled, as for any file."""
    config = checkpoint.get("hf_config") if isinstance(checkpoint, dict) else None
    if not config:
        return
    ours = hf_config(model)
    if not any(key.startswith("decoder_") for key in checkpoint["model"]):
        ours = {key: value for key, value in ours.items() if not key.startswith("decoder_")}
    side = lambda v: v[0] if isinstance(v, (list, tuple)) else v  # noqa: E731  (sizes may be [h, w])
    wrong = [f"{what} {config[key]} vs {ours[key]}" for key, what in CHECKED.items()
             if key in config and key in ours and side(config[key]) != ours[key]]
    if wrong:
        raise UserError(f"{path} does not fit the chosen --model (its config.json vs the model): {'; '.join(wrong)}")
    if log and config.get("layer_norm_eps", ours["layer_norm_eps"]) != ours["layer_norm_eps"]:
        log(f"note: {path} was built with LayerNorm eps {config['layer_norm_eps']}, this model uses "
            f"{ours['layer_norm_eps']} (outputs differ slightly)")
