"""The paper's "with [M]" baseline: an MAE whose encoder sees every patch.

The removed patches (the same ones :meth:`MaskedAutoencoderViT.random_masking` removes for the same noise) are
replaced by a learned encoder mask token before the position table is added, so the token still knows where it
stands. The encoder's output is then already in the patches' order at full length: the decoder adds its position
table and runs, and its own mask token is unused (frozen, so the optimizer and DDP skip it). The loss is MAE's:
the removed patches only. Only the benchmarks build this model; its state dict is MAE's plus
``encoder_mask_token``.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn as nn

from models_mae import MaskedAutoencoderViT


class MaskedAutoencoderWithMaskTokens(MaskedAutoencoderViT):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, self.pos_embed.shape[-1]))
        nn.init.normal_(self.encoder_mask_token, std=0.02)
        self.mask_token.requires_grad_(False)

    @classmethod
    def like(cls, model: MaskedAutoencoderViT) -> "MaskedAutoencoderWithMaskTokens":
        """The baseline with ``model``'s architecture, options and weights (a fresh ``encoder_mask_token``)."""
        embed_dim, decoder_dim = model.pos_embed.shape[-1], model.decoder_pos_embed.shape[-1]
        twin = cls(img_size=model.patch_embed.img_size, patch_size=model.patch_embed.patch_size,
                   in_chans=model.in_chans, embed_dim=embed_dim, depth=len(model.blocks),
                   num_heads=model.blocks[0].attn.num_heads, decoder_embed_dim=decoder_dim,
                   decoder_depth=len(model.decoder_blocks), decoder_num_heads=model.decoder_blocks[0].attn.num_heads,
                   mlp_ratio=model.blocks[0].mlp.fc1.out_features / embed_dim,
                   norm_layer=partial(nn.LayerNorm, eps=model.norm.eps), norm_pix_loss=model.norm_pix_loss,
                   grad_ckpt=model.grad_ckpt)
        # shapes must agree key by key; the only key the model lacks is the encoder's mask token
        missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
        if missing != ["encoder_mask_token"] or unexpected:
            raise ValueError(f"not an MAE layout: missing {missing}, unexpected {unexpected}")
        return twin.to(model.pos_embed.device)

    @torch.jit.ignore
    def no_weight_decay(self):
        return super().no_weight_decay() | {"encoder_mask_token"}

    def random_masking(self, x, mask_ratio, noise=None):
        """Every token stays; the removed ones (``random_masking``'s for the same noise) become the encoder mask token.

        x: (N, L, D), the patches with the position table added. Returns the tokens (N, L, D) in the patches' order,
        the binary mask (N, L; 0 keep, 1 remove) and ``ids_restore`` as ``random_masking`` does.
        """
        n, length, _ = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_restore = torch.argsort(torch.argsort(noise, dim=1), dim=1)  # each patch's rank in the shuffle
        mask = (ids_restore >= len_keep).float()
        # token + position for a removed patch, patch + position for a kept one
        x = torch.where(mask.unsqueeze(-1).bool(), self.encoder_mask_token + self.pos_embed[:, 1:, :], x)
        return x, mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        """``x``: the encoder's output at full length, cls first, already in the patches' order."""
        x = self.decoder_embed(x) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # drop the cls token
