"""Layer-wise lr decay (ELECTRA, BEiT) with the original MAE code's layer ids: n = depth + 1; tokens, position table
and patch embedding 0, ``blocks.k`` k + 1, all after the blocks n; layer i trains at ``lr * layer_decay ** (n - i)``.
(timm's ``param_groups_layer_decay`` puts the ``--cls_token`` classifier's final ``norm`` in the last block's layer.)"""
from __future__ import annotations


def layer_id(name: str, num_layers: int) -> int:
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def param_groups_layer_decay(model, weight_decay: float, no_weight_decay_list=(), layer_decay: float = 0.75):
    """AdamW parameter groups: one per (layer, decay or not), each with its ``lr_scale``; no weight decay for 1-D
    parameters and for ``no_weight_decay_list`` (the position table and tokens)."""
    num_layers = len(model.blocks) + 1
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim > 1 and name not in no_weight_decay_list
        layer = layer_id(name, num_layers)
        group = groups.setdefault((layer, decay), {"params": [], "weight_decay": weight_decay if decay else 0.0,
                                                   "lr_scale": layer_decay ** (num_layers - layer)})
        group["params"].append(param)
    return list(groups.values())
