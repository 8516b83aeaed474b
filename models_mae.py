"""Masked autoencoder with a Vision Transformer backbone (He et al., "Masked Autoencoders Are Scalable Vision
Learners"): the encoder sees only the visible patches; a light decoder gets them plus a shared mask token per removed
patch and predicts every patch; the loss counts the removed patches only. Names and shapes are the original's, so
its released checkpoints load with ``strict=True``. The decoder regresses pixels unless ``set_target`` attaches
another target (``util/targets.py``). Importing this module registers the ``mae_vit_*`` models in timm."""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block
from torch.utils.checkpoint import checkpoint

from util.pos_embed import sincos_2d_tensor


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0, decoder_mlp_ratio=None,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False, grad_ckpt=False):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        self.grad_ckpt = grad_ckpt
        # a target generator (util/targets.py) and its loss; plain attributes, so the state dict stays the original
        self.target_fn, self.target_loss = None, "mse"

        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        if any(s % p for s, p in zip(self.patch_embed.img_size, self.patch_embed.patch_size)):
            raise ValueError(f"image size {img_size} is not divisible by the patch size {patch_size}")
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table; a Parameter (not a buffer) so the state dict matches the original
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(  # the original has one MLP ratio for both; ViT-g's decoder needs its own
            [Block(decoder_embed_dim, decoder_num_heads, decoder_mlp_ratio or mlp_ratio, qkv_bias=True,
                   norm_layer=norm_layer)
             for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        patch_h, patch_w = self.patch_embed.patch_size
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_h * patch_w * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d_tensor(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_2d_tensor(self.decoder_pos_embed.shape[-1], grid))
        # patch projection initialised like a Linear layer on its flattened weight
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def set_target(self, target_fn):
        """Regress ``target_fn(imgs)`` (N, L, ``target_fn.dim``) with ``target_fn.loss`` instead of pixels: the last
        decoder layer is rebuilt at that width. ``target_fn`` is not a module of the model, so a teacher inside it
        is never saved, optimised or wrapped in DDP."""
        self.target_fn, self.target_loss = target_fn, target_fn.loss
        if self.decoder_pred.out_features != target_fn.dim:
            old = self.decoder_pred
            self.decoder_pred = nn.Linear(old.in_features, target_fn.dim, device=old.weight.device)
            self._init_weights(self.decoder_pred)

    @torch.jit.ignore
    def no_weight_decay(self):
        return {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        self.grad_ckpt = enable

    @property
    def patch_size(self):
        return self.patch_embed.patch_size

    def patchify(self, imgs):
        """(N, C, H, W) -> (N, L, p*q*C), channels last inside a patch, as the original."""
        p, q = self.patch_size
        n, c, h, w = imgs.shape
        if h % p or w % q:
            raise ValueError(f"image of {h}x{w} px is not divisible into {p}x{q} patches")
        x = imgs.reshape(n, c, h // p, p, w // q, q)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // q), p * q * c)

    def unpatchify(self, x, grid_size=None):
        """(N, L, p*q*C) -> (N, C, H, W) on the model's patch grid (or ``grid_size``)."""
        p, q = self.patch_size
        gh, gw = grid_size or self.patch_embed.grid_size
        c = x.shape[2] // (p * q)
        x = x.reshape(x.shape[0], gh, gw, p, q, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * q)

    def random_masking(self, x, mask_ratio, noise=None):
        """Keep the ``int(L * (1 - mask_ratio))`` patches of x (N, L, D) with the smallest noise (N, L), uniform unless
        given. Returns the kept tokens, the mask (N, L; 0 keep, 1 remove) and ``ids_restore``, which un-shuffles."""
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascend: small is keep, large is remove
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, 1, ids_restore)  # back to the patches' order
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            # non-reentrant checkpointing: works with torch.compile and with inputs that need no grad
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        # the mask token in every removed slot, then all patches back in their original order
        mask_tokens = self.mask_token.expand(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], -1)
        patches = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = torch.cat([x[:, :1, :], patches], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # drop the cls token

    def forward_target(self, imgs):
        """What the decoder regresses per patch: the target generator's output, else the pixels (normalised per
        patch with ``norm_pix_loss``)."""
        if self.target_fn is not None:
            return self.target_fn(imgs)
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            target = (target - target.mean(dim=-1, keepdim=True)) / (target.var(dim=-1, keepdim=True) + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask):
        """The per-patch loss, averaged over the removed patches only."""
        target = self.forward_target(imgs)
        if self.target_loss == "mse":
            loss = ((pred - target) ** 2).mean(dim=-1)
        elif self.target_loss == "smooth_l1":
            loss = F.smooth_l1_loss(pred.float(), target.float(), reduction="none").mean(dim=-1)
        elif self.target_loss == "cosine":  # MILAN's 2 - 2 cos
            loss = 2.0 - 2.0 * F.cosine_similarity(pred.float(), target.float(), dim=-1, eps=1e-8)
        else:
            raise ValueError(f"unknown target loss {self.target_loss!r}; choose mse, smooth_l1 or cosine")
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask


DECODER_512D8B = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)  # the original's decoder
DECODER_256D4B = dict(decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)


def _create(pretrained=False, defaults=None, **kwargs):
    if pretrained:
        raise ValueError("MAE models have no hub weights here; build the model, then load a file with "
                         "util.checkpoint.load_pretrained(model, path)")
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
    return MaskedAutoencoderViT(**{**defaults, **kwargs})


@register_model
def mae_vit_tiny_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=192, depth=12, num_heads=3, **DECODER_256D4B), **kwargs)


@register_model
def mae_vit_small_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=384, depth=12, num_heads=6, **DECODER_256D4B), **kwargs)


@register_model
def mae_vit_base_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **DECODER_512D8B), **kwargs)


@register_model
def mae_vit_large_patch16(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **DECODER_512D8B), **kwargs)


@register_model
def mae_vit_huge_patch14(pretrained=False, **kwargs):
    return _create(pretrained, dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **DECODER_512D8B), **kwargs)


@register_model
def mae_vit_giant_patch14(pretrained=False, **kwargs):
    """timm's ViT-g/14 encoder (1408-d, 40 blocks, MLP ratio 48/11) with ViT-H's decoder (512-d, 8 blocks, ratio 4)."""
    return _create(pretrained, dict(patch_size=14, embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11,
                                    decoder_mlp_ratio=4.0, **DECODER_512D8B), **kwargs)


@register_model
def mae_vit_tiny_patch2(pretrained=False, **kwargs):
    """The CIFAR-10 small-data reference: 32 px, ViT-Tiny with 2-px patches, 192-d 4-block decoder."""
    return _create(pretrained, dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3,
                                    decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3), **kwargs)


@register_model
def mae_vit_tiny_patch4(pretrained=False, **kwargs):
    """ViT-Tiny with 4-px patches for 28-32 px images."""
    return _create(pretrained, dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                                    decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3), **kwargs)


@register_model
def mae_vit_micro_patch4(pretrained=False, **kwargs):
    """0.5 M parameters: 96-d x 4 blocks, 4-px patches at 28 px, 1 channel, 64-d 1-block decoder."""
    return _create(pretrained, dict(img_size=28, in_chans=1, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                                    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2), **kwargs)


@register_model
def mae_vit_mini_patch7(pretrained=False, **kwargs):
    """The demo's model (2.0 M parameters): 192-d x 4 blocks, 7-px patches at 28 px (16 patches), 1 channel, 128-d
    1-block decoder."""
    return _create(pretrained, dict(img_size=28, in_chans=1, patch_size=7, embed_dim=192, depth=4, num_heads=3,
                                    decoder_embed_dim=128, decoder_depth=1, decoder_num_heads=4), **kwargs)


# the original code's names
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14
