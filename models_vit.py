"""Vision Transformer classifiers for fine-tuning and linear probing of MAE encoders: timm's ``VisionTransformer``,
configured (not subclassed) so that the state dict has the original MAE layout. ``global_pool=True`` (the original
default) classifies the mean of the patch tokens after ``fc_norm``, with no final ``norm`` (timm's Identity), as in
the released fine-tuned checkpoints; ``global_pool=False`` classifies the class token after the final ``norm``.
Importing this module registers the ``vit_*`` models below with timm (no image-size suffix, as in the original)."""
from functools import partial

import torch.nn as nn
from timm.layers import trunc_normal_
from timm.models import register_model
from timm.models.vision_transformer import VisionTransformer


def vision_transformer(global_pool=True, **kwargs):
    """A timm ``VisionTransformer`` with MAE's defaults (qkv bias, LayerNorm eps 1e-6, mlp ratio 4)."""
    if isinstance(global_pool, str):  # timm spelling: "avg" / "token"
        global_pool = global_pool == "avg"
    img_size, patch = kwargs.get("img_size", 224), kwargs.get("patch_size", 16)
    if any(s % patch for s in ((img_size, img_size) if isinstance(img_size, int) else img_size)):
        raise ValueError(f"image size {img_size} is not divisible by the patch size {patch}")
    config = dict(mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6),
                  global_pool="avg" if global_pool else "token", fc_norm=global_pool)  # fc_norm: no final norm
    model = VisionTransformer(**{**config, **kwargs})
    # the original's class token init (timm 1.x draws normal(1e-6)); matters for from-scratch baselines
    if model.cls_token is not None:  # timm builds none with class_token=False
        trunc_normal_(model.cls_token, std=0.02)
    return model


def _create(pretrained=False, defaults=None, **kwargs):
    if pretrained:
        raise ValueError("these models have no hub weights here; build the model, then load a file with "
                         "util.checkpoint.load_pretrained(model, path)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
    return vision_transformer(**{**defaults, **kwargs})


@register_model
def vit_tiny_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_small_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6), **kwargs)


@register_model
def vit_base_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12), **kwargs)


@register_model
def vit_large_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16), **kwargs)


@register_model
def vit_huge_patch14(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16), **kwargs)


@register_model
def vit_giant_patch14(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11), **kwargs)


@register_model
def vit_tiny_patch2(pretrained=False, **kwargs):
    return _create(pretrained, dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_tiny_patch4(pretrained=False, **kwargs):
    return _create(pretrained, dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3), **kwargs)


@register_model
def vit_micro_patch4(pretrained=False, **kwargs):
    """Classifier twin of ``mae_vit_micro_patch4`` (28 px, 1 channel)."""
    return _create(pretrained, dict(img_size=28, in_chans=1, patch_size=4, embed_dim=96, depth=4, num_heads=3),
                   **kwargs)


@register_model
def vit_mini_patch7(pretrained=False, **kwargs):
    """Classifier twin of ``mae_vit_mini_patch7`` (the demo's model, 28 px, 1 channel)."""
    return _create(pretrained, dict(img_size=28, in_chans=1, patch_size=7, embed_dim=192, depth=4, num_heads=3),
                   **kwargs)
