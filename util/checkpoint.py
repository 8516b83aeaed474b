"""Reading and writing checkpoints: safe loading, atomic saving, and pretrained-weight loading.

One loader serves every program: this package's checkpoints and the original research code's released
files (``mae_pretrain_vit_*.pth`` encoder-only, ``*_full.pth``, ``mae_visualize_vit_*.pth``,
``mae_finetuned_vit_*.pth``). Files are read with ``torch.load(weights_only=True)``; the only class
allow-listed is ``argparse.Namespace`` (the original stored its arguments as one), so no pickled code
ever runs.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
from pathlib import Path

import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_

from util.errors import UserError


# prefixes that wrappers add to parameter names: DDP, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# position tables that follow the patch grid and are resampled when it differs
_POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
# keys a classifier legitimately lacks in a pretraining checkpoint: its new head and, in
# global-pool mode, the norm after pooling
CLASSIFIER_NEW_KEYS = ("head.", "fc_norm.")


def _namespace_allowed():
    """``argparse.Namespace`` allow-listed for ``weights_only`` loading: only while loading where torch has the
    context manager (2.5 and later), for the whole process on torch 2.4."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)
    if safe_globals is not None:
        return safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def load_checkpoint_file(path) -> dict:
    """Read a checkpoint (local path, or http(s) URL when online) without running pickled code."""
    path = str(path)
    if path.startswith(("http://", "https://")):
        # cached download; the file itself is still read with weights_only below
        hub_dir = Path(torch.hub.get_dir()) / "checkpoints"
        hub_dir.mkdir(parents=True, exist_ok=True)
        local = hub_dir / os.path.basename(path.split("?")[0])
        if not local.exists():
            torch.hub.download_url_to_file(path, str(local))
        path = str(local)
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with _namespace_allowed():
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for refused globals, others for corrupt files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            reason = ("it contains pickled objects other than tensors and plain containers, refused "
                      f"for safety ({reason})")
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None


def model_state_dict(checkpoint: dict, path="checkpoint") -> dict:
    """The model weights inside a checkpoint: ``{'model': ...}`` or a bare state dict."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} has no state dict of tensors (expected a 'model' entry or bare weights)")
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _current_umask() -> int:
    mask = os.umask(0)  # the only portable way to read it is to set it and put it back
    os.umask(mask)
    return mask


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename: a crash mid-write never
    leaves a truncated file where the last good checkpoint was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates the file owner-only (0600); give it the mode a plain open() would, so a
        # checkpoint is as readable by the user's group as the logs and figures next to it
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _grid(model):
    return tuple(model.patch_embed.grid_size)


def _resample_pos_embed(table: torch.Tensor, new_tokens: int, new_grid, key: str, path) -> torch.Tensor:
    """Resample a (1, 1 + gh*gw, D) table to ``new_grid``, keeping the cls row (timm's bicubic resample)."""
    old_patches = table.shape[1] - 1
    side = int(round(old_patches ** 0.5))
    if side * side != old_patches or new_tokens - 1 != new_grid[0] * new_grid[1]:
        raise UserError(
            f"{path}: cannot resample {key} of shape {tuple(table.shape)} to {new_tokens} tokens "
            f"(non-square source grid)"
        )
    return resample_abs_pos_embed(
        table, new_size=list(new_grid), old_size=[side, side], num_prefix_tokens=1, verbose=False
    )


def _new_head_linear(model):
    """The Linear layer at the end of ``model.head`` (a Linear, or a Sequential such as BN + Linear)."""
    head = getattr(model, "head", None)
    if isinstance(head, torch.nn.Linear):
        return head
    if isinstance(head, torch.nn.Sequential):
        linears = [m for m in head if isinstance(m, torch.nn.Linear)]
        return linears[-1] if linears else None
    return None


def load_pretrained(model, path, *, head_init_std=None, allow_missing=None, log=print) -> dict:
    """Load weights from ``path`` into ``model`` and report what happened.

    * position tables are resampled when the checkpoint's patch grid differs from the model's;
    * a classifier head of a different shape is dropped (and re-initialised);
    * keys the model does not have are ignored only if they are the pretraining-only parts
      (decoder, mask token, the final norm a global-pool classifier replaces by fc_norm);
    * missing keys are an error unless they start with a prefix in ``allow_missing`` (default: the
      classifier's new head and fc_norm when the model has a head, nothing otherwise).
    With ``head_init_std``, a head that was not loaded is initialised trunc-normal with that std and zero
    bias, as the original did (2e-5 fine-tuning, 0.01 linear probing).
    Returns ``{'missing': [...], 'unexpected': [...], 'resampled': [...], 'dropped': [...]}``.
    """
    checkpoint = load_checkpoint_file(path)
    state = model_state_dict(checkpoint, path)
    target = model.state_dict()
    is_classifier = hasattr(model, "head")
    if allow_missing is None:
        allow_missing = CLASSIFIER_NEW_KEYS if is_classifier else ()

    resampled, dropped, mismatched = [], [], []
    for key in list(state):
        if key not in target or state[key].shape == target[key].shape:
            continue
        if key in _POS_EMBED_KEYS:
            state[key] = _resample_pos_embed(state[key], target[key].shape[1], _grid(model), key, path)
            resampled.append(key)
        elif key.startswith("head."):
            dropped.append(key)  # a head for another number of classes
            del state[key]
        else:
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(target[key].shape)}")
    if mismatched:
        raise UserError(f"{path}: shape mismatch for " + "; ".join(mismatched))

    unexpected = [k for k in state if k not in target]
    ignorable = ("decoder_", "mask_token") + (("norm.",) if is_classifier else ())
    # a linear-probe checkpoint carries its BatchNorm inside the head; a plain classifier has none
    bad_unexpected = [k for k in unexpected if not (k.startswith(ignorable) or (is_classifier and k.startswith("head.")))]
    missing = [k for k in target if k not in state]
    bad_missing = [k for k in missing if not k.startswith(tuple(allow_missing))]
    if bad_missing or bad_unexpected:
        parts = []
        if bad_missing:
            hint = ""
            if any(k.startswith(("decoder_", "mask_token")) for k in bad_missing):
                hint = " (the file has no decoder: an encoder-only pretraining checkpoint?)"
            parts.append(f"missing keys {_names(bad_missing)}{hint}")
        if bad_unexpected:
            parts.append(f"unexpected keys {_names(bad_unexpected)}")
        raise UserError(f"{path} does not fit {type(model).__name__}: " + "; ".join(parts))

    model.load_state_dict({k: v for k, v in state.items() if k in target}, strict=False)

    head = _new_head_linear(model)
    head_missing = any(k.startswith("head.") for k in missing)
    if head_init_std is not None and head is not None and head_missing:
        trunc_normal_(head.weight, std=head_init_std)
        torch.nn.init.zeros_(head.bias)
    report = dict(missing=missing, unexpected=unexpected, resampled=resampled, dropped=dropped)
    saved = checkpoint.get("args")
    target = getattr(saved, "target", None) if not isinstance(saved, dict) else saved.get("target")
    if log and target:  # the encoder is what matters here; say what its decoder was trained to predict
        log(f"{path} was pretrained with --target {target}")
    if log:
        log(f"loaded {path}: " + ", ".join(f"{k} {_names(v)}" for k, v in report.items() if v) if any(report.values())
            else f"loaded {path}: all keys matched")
    return report


def _names(keys, limit=12):
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}]"


# ---------------------------------------------------------------- training state (resume)
def _rng_state() -> dict:
    """Every RNG a training step draws from, in types ``weights_only`` loading accepts."""
    import random

    import numpy as np

    np_state = np.random.get_state(legacy=False)
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype("int64")),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    np.random.set_state({"bit_generator": "MT19937",
                         "state": {"key": state["numpy"]["key"].numpy().astype("uint32"), "pos": state["numpy"]["pos"]},
                         "has_gauss": state["numpy"]["has_gauss"], "gauss": state["numpy"]["gauss"]})
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(args, epoch, model, optimizer, updater, *, keep=False, extra=None) -> None:
    """Write ``checkpoint-last.pth`` (and ``checkpoint-EPOCH.pth`` when ``keep``) atomically on rank 0.

    Holds ``model``, ``optimizer``, ``epoch``, ``scaler`` and ``args`` (a plain dict) like the original, plus
    every rank's RNG state so a resumed run continues exactly. Call on every rank (the RNG states are
    gathered with a collective).
    """
    from util import distributed
    from util.runtime import jsonable_args

    rng = distributed.all_gather_object(_rng_state())
    if not args.output_dir or not distributed.is_main_process():
        return
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "epoch": epoch,
        "scaler": updater.state_dict(),
        "args": jsonable_args(args),
        "rng": rng,
        **(extra or {}),
    }
    out = Path(args.output_dir)
    last = out / "checkpoint-last.pth"
    if keep:
        kept = out / f"checkpoint-{epoch}.pth"
        save_atomic(state, kept)
        _link_atomic(kept, last) or save_atomic(state, last)
    else:
        save_atomic(state, last)


def _link_atomic(source: Path, dest: Path) -> bool:
    """Make ``dest`` a hard link to ``source`` (atomically replacing it); False where links are unsupported."""
    tmp = dest.with_name(f".{dest.name}.link")
    try:
        tmp.unlink(missing_ok=True)
        os.link(source, tmp)
        os.replace(tmp, dest)
        return True
    except OSError:
        tmp.unlink(missing_ok=True)
        return False


def find_resume_checkpoint(args) -> str:
    """``--resume`` if given; with ``--auto_resume``, ``OUTPUT_DIR/checkpoint-last.pth`` when it exists."""
    if args.resume:
        return args.resume
    if getattr(args, "auto_resume", False) and args.output_dir:
        last = Path(args.output_dir) / "checkpoint-last.pth"
        if last.is_file():
            return str(last)
    return ""


def resume_training(args, model, optimizer=None, updater=None) -> dict | None:
    """Restore model, optimizer, scaler, epoch and RNG state from the resume checkpoint, if any.

    Sets ``args.start_epoch`` to the epoch after the saved one. Returns the checkpoint (for program-specific
    entries) or None when there is nothing to resume.
    """
    from util import distributed

    path = find_resume_checkpoint(args)
    if not path:
        return None
    checkpoint = load_checkpoint_file(path)
    state = model_state_dict(checkpoint, path)
    expected = model.state_dict()
    mismatched = [f"{k} {tuple(v.shape)} vs {tuple(expected[k].shape)}"
                  for k, v in state.items() if k in expected and v.shape != expected[k].shape]
    if mismatched:  # load_state_dict would raise a multi-line RuntimeError
        raise UserError(f"cannot resume from {path}: shape mismatch for {'; '.join(mismatched[:4])} "
                              f"(a checkpoint of another model, input size or --target?)")
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise UserError(
            f"cannot resume from {path}: missing keys {_names(result.missing_keys)}, "
            f"unexpected keys {_names(result.unexpected_keys)} (a checkpoint of another model?)"
        )
    print(f"resumed model from {path}")
    if optimizer is not None and "optimizer" in checkpoint and "epoch" in checkpoint and not getattr(args, "eval", False):
        optimizer.load_state_dict(checkpoint["optimizer"])
        # a mid-epoch checkpoint continues its epoch at the next step; an epoch-end one starts the next epoch
        args.start_step = checkpoint.get("next_step", 0)
        args.start_epoch = checkpoint["epoch"] + (0 if args.start_step else 1)
        if updater is not None and "scaler" in checkpoint:
            updater.load_state_dict(checkpoint["scaler"])
        rng = checkpoint.get("rng")
        if rng and len(rng) == distributed.get_world_size():
            _set_rng_state(rng[distributed.get_rank()])
        elif rng:
            print(f"note: {path} was written by {len(rng)} processes, this run has "
                  f"{distributed.get_world_size()}: random streams restart from the seed")
        print(f"resumed optimizer and scaler; continuing at epoch {args.start_epoch}"
              + (f", step {args.start_step}" if args.start_step else ""))
    return checkpoint
