"""Masked autoencoder with a Vision Transformer backbone (He et al., "Masked Autoencoders Are Scalable
Vision Learners").

The encoder sees only the visible patches; a light decoder gets the encoded patches plus one shared,
learnable mask token per removed patch and predicts the pixels of every patch; the loss counts the removed
patches only. Parameter names and shapes are those of the original research code, so its released
checkpoints load with ``strict=True``.

Other targets (HOG, a teacher's features; see ``util/targets.py``) change only the width of the last decoder
layer (``pred_dim``) and the per-patch loss (``target_loss``); their values are passed to ``forward`` as
``target``.

Importing this module registers the ``mae_vit_*`` constructors in timm's registry::

    import models_mae, timm
    model = timm.create_model("mae_vit_base_patch16", norm_pix_loss=True)
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint
from timm.layers import PatchEmbed
from timm.models import register_model
from timm.models.vision_transformer import Block

from util.pos_embed import sincos_2d_tensor
from util.targets import patch_loss


class MaskedAutoencoderViT(nn.Module):
    def __init__(
        self,
        img_size=224,
        patch_size=16,
        in_chans=3,
        embed_dim=1024,
        depth=24,
        num_heads=16,
        decoder_embed_dim=512,
        decoder_depth=8,
        decoder_num_heads=16,
        mlp_ratio=4.0,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        norm_pix_loss=False,
        encoder_mask_tokens=False,
        grad_ckpt=False,
        pred_dim=None,
        target_loss="mse",
    ):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss
        # how a given target (forward's ``target``) is compared with the prediction; a plain attribute, so the
        # state dict stays the original one
        self.target_loss = target_loss
        self.encoder_mask_tokens = encoder_mask_tokens
        self.grad_ckpt = grad_ckpt

        # --- encoder ---
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        if any(s % p for s, p in zip(self.patch_embed.img_size, self.patch_embed.patch_size)):
            raise ValueError(
                f"image size {img_size} is not divisible by the patch size {patch_size}"
            )
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        # fixed sin-cos table; a Parameter (not a buffer) so the state dict matches the original
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)]
        )
        self.norm = norm_layer(embed_dim)
        if encoder_mask_tokens:  # only then: the default state dict stays the original one
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))

        # --- decoder ---
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            [
                Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
                for _ in range(decoder_depth)
            ]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        patch_h, patch_w = self.patch_embed.patch_size
        # pixels per patch by default; the target's width (HOG histograms, teacher features) otherwise
        self.decoder_pred = nn.Linear(decoder_embed_dim, pred_dim or patch_h * patch_w * in_chans, bias=True)
        if encoder_mask_tokens:
            # the decoder's mask token is unused then; frozen, DDP does not wait for its gradient
            self.mask_token.requires_grad_(False)

        self.initialize_weights()

    # ------------------------------------------------------------------ init
    def initialize_weights(self):
        grid = self.patch_embed.grid_size
        self.pos_embed.data.copy_(sincos_2d_tensor(self.pos_embed.shape[-1], grid))
        self.decoder_pos_embed.data.copy_(sincos_2d_tensor(self.decoder_pos_embed.shape[-1], grid))
        # patch projection initialised like a Linear layer on its flattened weight
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        if self.encoder_mask_tokens:
            nn.init.normal_(self.encoder_mask_token, std=0.02)
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

    @torch.jit.ignore
    def no_weight_decay(self):
        # used by timm's param_groups_weight_decay (1-D params are excluded there anyway)
        return {"pos_embed", "decoder_pos_embed", "cls_token", "mask_token", "encoder_mask_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable=True):
        """timm's spelling of the ``grad_ckpt`` option."""
        self.grad_ckpt = enable

    # ------------------------------------------------------------- patches
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
        """(N, L, p*q*C) -> (N, C, H, W); the grid defaults to the model's (square grids may be inferred)."""
        p, q = self.patch_size
        gh, gw = grid_size or self.patch_embed.grid_size
        if gh * gw != x.shape[1]:
            side = int(round(x.shape[1] ** 0.5))
            if side * side != x.shape[1]:
                raise ValueError(f"cannot infer the patch grid of {x.shape[1]} patches; pass grid_size")
            gh = gw = side
        c = x.shape[2] // (p * q)
        x = x.reshape(x.shape[0], gh, gw, p, q, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, gh * p, gw * q)

    # ------------------------------------------------------------- masking
    def random_masking(self, x, mask_ratio, noise=None):
        """Keep the ``int(L * (1 - mask_ratio))`` patches with the smallest noise, per sample.

        x: (N, L, D); noise: (N, L) in [0, 1), drawn uniformly when None (pass it to reproduce a mask).
        Returns the kept tokens (N, len_keep, D), the binary mask (N, L; 0 keep, 1 remove) in the original
        patch order, and ``ids_restore`` (N, L) which un-shuffles.
        """
        ids_keep, mask, ids_restore = self.masking_ids(x.shape[0], x.shape[1], mask_ratio, noise, x.device)
        # expand is a view: the gather reads the kept rows without materialising an index copy
        x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        return x_masked, mask, ids_restore

    @staticmethod
    def masking_ids(n, length, mask_ratio, noise=None, device=None):
        """The indices of :meth:`random_masking` without touching tokens: ``(ids_keep, mask, ids_restore)``."""
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {mask_ratio}")
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=device)
        elif noise.shape != (n, length):
            raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        # a patch is removed when its rank in the shuffle is past len_keep (one comparison, no scatter)
        mask = (ids_restore >= len_keep).float()
        return ids_shuffle[:, :len_keep], mask, ids_restore

    # ------------------------------------------------------------- forward
    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)
        if self.encoder_mask_tokens:
            # "with [M]": every patch stays, the removed ones become the encoder's mask token (before the
            # position table is added, so the token still knows where it stands)
            _, mask, ids_restore = self.masking_ids(x.shape[0], x.shape[1], mask_ratio, noise, x.device)
            x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token, x)
            x = x + self.pos_embed[:, 1:, :]
        else:
            x = x + self.pos_embed[:, 1:, :]
            x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        ckpt = self.grad_ckpt and self.training and torch.is_grad_enabled()
        for blk in self.blocks:
            # non-reentrant checkpointing: works with torch.compile and with inputs that need no grad
            x = checkpoint(blk, x, use_reentrant=False) if ckpt else blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent, ids_restore):
        x = self.decoder_embed(latent)
        if not self.encoder_mask_tokens:
            # put the encoded patches back in place, the shared mask token in every removed slot: one gather
            # from [cls, kept..., mask token] (N, len_keep + 2, D) straight into (N, L + 1, D), instead of
            # materialising the mask tokens, a shuffled copy and a concatenation at full length
            n, length = ids_restore.shape
            len_keep = x.shape[1] - 1
            src = torch.cat([x, self.mask_token.expand(n, 1, -1)], dim=1)
            # slot of each patch in src: kept patches at 1 + their rank, removed ones at the mask token
            slot = torch.where(ids_restore < len_keep, ids_restore + 1, len_keep + 1)
            slot = torch.cat([slot.new_zeros(n, 1), slot], dim=1)  # the cls token stays first
            x = torch.gather(src, 1, slot.unsqueeze(-1).expand(-1, -1, x.shape[2]))
        x = x + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # drop the cls token

    def target_patches(self, imgs):
        """The regression target per patch: pixels, normalised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs, pred, mask, target=None):
        """Loss per patch, averaged over the removed patches only: mean squared error against the pixels, or
        ``self.target_loss`` against ``target`` (N, L, pred_dim) when one is given."""
        if target is None:
            loss = (pred - self.target_patches(imgs)) ** 2
            loss = loss.mean(dim=-1)
        else:
            if target.shape != pred.shape:
                raise ValueError(f"target of shape {tuple(target.shape)} for predictions of shape {tuple(pred.shape)} "
                                 f"(the decoder's pred_dim must equal the target's width)")
            loss = patch_loss(pred, target, self.target_loss)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio=0.75, noise=None, target=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask, target)
        return loss, pred, mask


# ---------------------------------------------------------------- constructors
_ORIGINAL_DECODER = dict(decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def _create(pretrained=False, defaults=None, **kwargs):
    if pretrained:
        raise ValueError(
            "MAE models have no hub weights here; build the model, then load a file with "
            "util.checkpoint.load_pretrained(model, path)"
        )
    for key in ("pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"):
        kwargs.pop(key, None)  # timm.create_model passes these to every entrypoint
    return MaskedAutoencoderViT(**{**defaults, **kwargs})


@register_model
def mae_vit_tiny_patch16(pretrained=False, **kwargs):
    """ViT-Tiny/16 encoder with a 256-d, 4-block decoder (lighter than the encoder's width allows)."""
    defaults = dict(patch_size=16, embed_dim=192, depth=12, num_heads=3,
                    decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_small_patch16(pretrained=False, **kwargs):
    """ViT-Small/16 encoder with a 256-d, 4-block decoder."""
    defaults = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6,
                    decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_base_patch16(pretrained=False, **kwargs):
    defaults = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12, **_ORIGINAL_DECODER)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_large_patch16(pretrained=False, **kwargs):
    defaults = dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16, **_ORIGINAL_DECODER)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_huge_patch14(pretrained=False, **kwargs):
    defaults = dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16, **_ORIGINAL_DECODER)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_tiny_patch2(pretrained=False, **kwargs):
    """The CIFAR-10 small-data reference: 32 px, ViT-Tiny (192-d x 12 x 3 heads), patch 2, 192-d 4-block decoder."""
    defaults = dict(img_size=32, patch_size=2, embed_dim=192, depth=12, num_heads=3,
                    decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_tiny_patch4(pretrained=False, **kwargs):
    """ViT-Tiny with 4-px patches for 28-32 px images (64 patches at 32 px, 49 at 28 px)."""
    defaults = dict(img_size=32, patch_size=4, embed_dim=192, depth=12, num_heads=3,
                    decoder_embed_dim=192, decoder_depth=4, decoder_num_heads=3)
    return _create(pretrained, defaults, **kwargs)


@register_model
def mae_vit_micro_patch4(pretrained=False, **kwargs):
    """The demo's model: 96-d x 4 blocks x 3 heads, 4-px patches at 28 px (Fashion-MNIST), 64-d 1-block decoder.
    Small enough to pretrain for several epochs of Fashion-MNIST on 2 CPU cores in minutes."""
    defaults = dict(img_size=28, in_chans=1, patch_size=4, embed_dim=96, depth=4, num_heads=3,
                    decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=2)
    return _create(pretrained, defaults, **kwargs)


# the original code's aliases
mae_vit_base_patch16_dec512d8b = mae_vit_base_patch16
mae_vit_large_patch16_dec512d8b = mae_vit_large_patch16
mae_vit_huge_patch14_dec512d8b = mae_vit_huge_patch14
