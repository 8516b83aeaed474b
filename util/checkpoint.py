"""Checkpoints: safe reading, one way to fit weights to a model, atomic writing, resuming. Ours and the original's
released files (``mae_pretrain_vit_*.pth``, ``*_full.pth``, ``mae_visualize_vit_*.pth``, ``mae_finetuned_vit_*.pth``)
are read with ``weights_only``, only ``argparse.Namespace`` (the original's arguments) allow-listed."""
from __future__ import annotations

import argparse
import contextlib
import errno
import os
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import NamedTuple

import numpy as np
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed, trunc_normal_
from torch.utils._pytree import tree_leaves

from util import distributed, output_dir, sharded, weights
from util.errors import UserError, one_line
from util.logger import drop_log_lines_from

WRAPPER_PREFIX = re.compile(r"^(module\.)?(_orig_mod\.)?")  # what DDP and torch.compile add to parameter names
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")  # they follow the patch grid: resampled when it differs
CLASSIFIER_NEW = ("head.", "fc_norm.")  # a classifier's parts that a pretraining checkpoint lacks
PRETRAINING_ONLY = ("decoder_", "mask_token")  # a pretraining checkpoint's parts that a classifier has no use for


def _namespace_allowed():
    """``argparse.Namespace`` allow-listed for ``weights_only``: while loading (torch 2.5+), for good on torch 2.4."""
    if hasattr(torch.serialization, "safe_globals"):
        return torch.serialization.safe_globals([argparse.Namespace])
    torch.serialization.add_safe_globals([argparse.Namespace])
    return contextlib.nullcontext()


def load_checkpoint_file(path) -> dict:
    """Read weights without running pickled code, in the original layout: a checkpoint or ``.safetensors`` file, a
    timm or Hugging Face ViTMAE directory, a hub name (``util.weights``), or an http(s) URL when online."""
    path = str(path)
    if path.startswith(("http://", "https://")):  # cached download; still read with weights_only below
        local = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(path.split("?")[0])
        if not local.exists():
            local.parent.mkdir(parents=True, exist_ok=True)
            torch.hub.download_url_to_file(path, str(local))
        path = str(local)
    if sharded.is_sharded(path):  # an --fsdp checkpoint directory: its model consolidated in this process
        return {**sharded.load_extra(path), "model": sharded.consolidated_model_state(path)}
    file, config = weights.locate(weights.resolve(path))
    if not os.path.isfile(file):
        raise UserError(f"checkpoint {path} does not exist")
    with open(file, "rb") as f:
        head = f.read(2)
    safetensors_file = file.endswith(".safetensors")
    # torch.save writes a zip archive (the legacy format: a pickle, protocol 2); anything else is no checkpoint
    if not (safetensors_file or zipfile.is_zipfile(file) or head == b"\x80\x02"):
        raise UserError(f"cannot load checkpoint {path}: not a PyTorch checkpoint (damaged or truncated file?)")
    try:
        if safetensors_file:
            checkpoint = safetensors.torch.load_file(file)
        else:
            with _namespace_allowed():
                checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError for refused globals, others for corrupt files
        reason = one_line(e)
        if "Unsupported global" in str(e) or "GLOBAL" in str(e):
            reason = f"it holds pickled objects other than tensors and plain containers, refused for safety ({reason})"
        raise UserError(f"cannot load checkpoint {path}: {reason}") from None
    return weights.to_original_layout(checkpoint, config, path)


def model_state_dict(checkpoint, path="checkpoint") -> dict:
    """The model weights inside a checkpoint (``{'model': ...}`` or a bare state dict), wrapper prefixes removed."""
    if not isinstance(checkpoint, dict):
        raise UserError(f"{path} holds a {type(checkpoint).__name__}, not a dict of weights")
    state = checkpoint.get("model", checkpoint)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} has no state dict of tensors (expected a 'model' entry or bare weights)")
    return {WRAPPER_PREFIX.sub("", key): value for key, value in state.items()}


def saved_args(checkpoint) -> dict:
    """The training arguments stored in a checkpoint (a dict here, a Namespace in the original's files), or {}."""
    saved = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    if isinstance(saved, argparse.Namespace):
        return vars(saved)
    return saved if isinstance(saved, dict) else {}


def jsonable_args(args) -> dict:
    """``vars(args)`` with only plain values, so checkpoints load with ``weights_only=True`` and no allow-list."""
    out = {}
    for key, value in vars(args).items():
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            out[key] = list(value)
        else:
            out[key] = str(value)
    return out


def _names(keys, limit=8) -> str:
    keys = list(keys)
    return "[" + ", ".join(keys[:limit]) + (", ..." if len(keys) > limit else "") + "]"


def fit_state_dict(model, state: dict, path, *, may_miss=(), may_ignore=(), adapt=True, name=None) -> dict:
    """Load ``state`` into ``model``; everything that does not fit is one ``UserError`` naming the keys.
    ``may_miss`` / ``may_ignore``: key prefixes the model may lack in ``state`` / ``state`` may hold beyond it. With
    ``adapt``, position tables are resampled to the model's patch grid (bicubic, no antialias, as the original) and a
    classifier head of another shape is dropped. Returns the keys missing, unexpected (ignored), resampled, dropped."""
    expected = model.state_dict()
    state = dict(state)
    resampled, dropped, mismatched = [], [], []
    for key in [k for k in state if k in expected and state[k].shape != expected[k].shape]:
        if adapt and key in POS_EMBED_KEYS:
            state[key] = _resample_pos_embed(state[key], tuple(model.patch_embed.grid_size), key, path)
            resampled.append(key)
        elif adapt and key.startswith("head."):
            dropped.append(key)  # a head for another number of classes
            del state[key]
        else:
            mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(expected[key].shape)}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    bad_missing = [k for k in missing if not k.startswith(tuple(may_miss))]
    bad_unexpected = [k for k in unexpected if not k.startswith(tuple(may_ignore))]
    problems = [f"shape mismatch for {'; '.join(mismatched[:6])}"] if mismatched else []
    if bad_missing:
        no_decoder = any(k.startswith(PRETRAINING_ONLY) for k in bad_missing)
        problems.append(f"missing keys {_names(bad_missing)}"
                        + (" (the file has no decoder: an encoder-only pretraining checkpoint?)" if no_decoder else ""))
    if bad_unexpected:
        problems.append(f"unexpected keys {_names(bad_unexpected)}")
    if problems:
        raise UserError(f"{path} does not fit {name or type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
    return dict(missing=missing, unexpected=unexpected, resampled=resampled, dropped=dropped)


def _resample_pos_embed(table: torch.Tensor, grid, key: str, path) -> torch.Tensor:
    """A (1, 1 + s*s, D) table resampled to ``grid``, the cls row kept."""
    side = int(round((table.shape[1] - 1) ** 0.5))
    if side * side != table.shape[1] - 1:
        raise UserError(f"{path}: cannot resample {key} of shape {tuple(table.shape)} (not a square grid) to {grid}")
    return resample_abs_pos_embed(table, new_size=list(grid), old_size=[side, side], num_prefix_tokens=1,
                                  interpolation="bicubic", antialias=False, verbose=False)


def load_pretrained(model, path, *, head_init_std=None, log=print) -> dict:
    """Pretrained weights (ours or the released files) into ``model``: an MAE model, or a classifier whose new head
    (and ``fc_norm``) may be missing and which ignores the decoder. With ``head_init_std`` a head that was not
    loaded is initialised trunc-normal with that std and zero bias (the original: 2e-5 fine-tuning, 0.01 probing)."""
    checkpoint = load_checkpoint_file(path)
    weights.check_architecture(checkpoint, model, path, log=log)  # a ViTMAE config says first what does not fit
    classifier = hasattr(model, "head")
    report = fit_state_dict(model, model_state_dict(checkpoint, path), path,  # a global-pool classifier has no norm
                            may_miss=CLASSIFIER_NEW if classifier else (),
                            may_ignore=PRETRAINING_ONLY + (("norm.", "head.") if classifier else ()))
    head = getattr(model, "head", None)
    head = head[-1] if isinstance(head, torch.nn.Sequential) else head
    new_head = any(k.startswith("head.") for k in report["missing"])
    if head_init_std is not None and new_head and isinstance(head, torch.nn.Linear):
        trunc_normal_(head.weight, std=head_init_std)
        torch.nn.init.zeros_(head.bias)
    target = saved_args(checkpoint).get("target")
    if log:
        if target:  # say what the encoder's decoder was trained to predict
            log(f"{path} was pretrained with --target {target}")
        details = ", ".join(f"{k} {_names(v)}" for k, v in report.items() if v)
        log(f"loaded {path}: {details or 'all keys matched'}")
    return report


def save_atomic(obj, path) -> None:
    """``torch.save`` to a temporary file in the same directory, then rename: a crash mid-write never truncates the
    last good checkpoint. A write that fails (full disk, no permission) is one line, with no temporary file left."""
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)  # the only portable way to read it is to set it and put it back
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide checkpoints from the user's group
        os.replace(tmp, path)
    except BaseException as e:
        if tmp:
            Path(tmp).unlink(missing_ok=True)
        free = shutil.disk_usage(path.parent).free if path.parent.is_dir() else 0
        needed = sum(t.nbytes for t in tree_leaves(obj) if isinstance(t, torch.Tensor))
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT) or isinstance(e, RuntimeError) \
                and free < needed:  # torch reports a full disk as a RuntimeError of its zip writer
            raise UserError(f"cannot write checkpoint {path}: no space left on the device ({free / 2**20:.0f} MiB "
                            f"free, the checkpoint needs about {needed / 2**20:.0f} MiB)") from None
        if isinstance(e, OSError):
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        raise


def _rng_state() -> dict:
    """Every RNG a training step draws from, in types ``weights_only`` loading accepts."""
    _, key, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = {"key": torch.from_numpy(key.astype("int64")), "pos": pos, "has_gauss": has_gauss, "gauss": gauss}
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": numpy_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    key, pos, has_gauss, gauss = (state["numpy"][k] for k in ("key", "pos", "has_gauss", "gauss"))
    np.random.set_state(("MT19937", key.numpy().astype("uint32"), pos, has_gauss, gauss))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_training_state(args, epoch, model, optimizer, updater, *, keep=False, max_accuracy=0.0, next_step=0):
    """Write ``checkpoint-last.pth`` (and ``checkpoint-EPOCH.pth`` when ``keep``) atomically on rank 0: the original's
    entries (``args`` as a plain dict) plus every rank's RNG state for an exact resume; ``next_step`` > 0 marks a
    checkpoint inside ``epoch``. Under ``--fsdp``, directories ``checkpoint-*.dcp`` of every rank's shards instead.
    Call on every rank (the RNG states are gathered with a collective)."""
    rng = distributed.all_gather_object(_rng_state())
    if not args.output_dir:
        return
    state = {"epoch": epoch, "scaler": updater.state_dict(), "args": jsonable_args(args), "rng": rng,
             "max_accuracy": max_accuracy, **({"next_step": next_step} if next_step else {})}
    names = ([f"checkpoint-{epoch}"] if keep else []) + ["checkpoint-last"]  # copies: damage must not take both
    out = Path(args.output_dir)
    for name in names:
        if getattr(args, "fsdp", False):
            sharded.save(out / f"{name}.dcp", model, optimizer, state)
        elif distributed.is_main_process():
            full = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), **state}
            save_atomic(full, out / f"{name}.pth")


class Resumed(NamedTuple):
    """Where a run continues: the first epoch, the step inside it (> 0 after a mid-epoch checkpoint), the best
    accuracy so far, and the saved training arguments."""
    epoch: int = 0
    step: int = 0
    max_accuracy: float = 0.0
    args: dict = {}


def resume_training(args, model, optimizer=None, updater=None) -> Resumed:
    """Restore model, optimizer, scaler and every RNG from ``--resume`` or, with ``--auto_resume``, the newest
    checkpoint in ``--output_dir`` that loads (damaged ones are skipped, saying why). Nothing to resume: start at
    ``--start_epoch``. ``log.txt`` lines of the epochs to be run again are dropped, so each epoch is logged once."""
    path, checkpoint = _checkpoint_to_resume(args)
    if checkpoint is None:
        return Resumed(epoch=args.start_epoch)
    is_sharded = sharded.is_sharded(path)
    with_optimizer = optimizer is not None and "epoch" in checkpoint and not getattr(args, "eval", False)
    if is_sharded:  # resharded to this run's processes by DCP
        sharded.load_into(path, model, optimizer if with_optimizer else None)
    else:
        fit_state_dict(model, model_state_dict(checkpoint, path), f"cannot resume from {path}:", adapt=False)
    print(f"resumed model from {path}")
    resumed = Resumed(epoch=args.start_epoch, max_accuracy=checkpoint.get("max_accuracy", 0.0),
                      args=saved_args(checkpoint))
    if not with_optimizer or not (is_sharded or "optimizer" in checkpoint):
        return resumed
    if not is_sharded:
        optimizer.load_state_dict(checkpoint["optimizer"])
    if updater is not None and "scaler" in checkpoint:
        updater.load_state_dict(checkpoint["scaler"])
    rng = checkpoint.get("rng")
    if rng and len(rng) == distributed.get_world_size():
        _set_rng_state(rng[distributed.get_rank()])
    elif rng:
        print(f"note: {path} was written by {len(rng)} processes, this run has {distributed.get_world_size()}: "
              f"random streams restart from the seed")
    step = checkpoint.get("next_step", 0)  # > 0: a mid-epoch checkpoint, continued at that step; else the next epoch
    resumed = resumed._replace(epoch=checkpoint["epoch"] + (0 if step else 1), step=step)
    if args.output_dir and distributed.is_main_process():
        drop_log_lines_from(args.output_dir, resumed.epoch)
    print(f"resumed optimizer and scaler; continuing at epoch {resumed.epoch}" + (f", step {step}" if step else ""))
    return resumed


def _checkpoint_to_resume(args):
    """(path, checkpoint) of ``--resume``, or with ``--auto_resume`` of the newest loadable one; (None, None)."""
    if args.resume:
        read = sharded.load_extra if sharded.is_sharded(args.resume) else load_checkpoint_file
        return args.resume, read(args.resume)
    if not (args.auto_resume and args.output_dir):
        return None, None
    found = output_dir.checkpoints(Path(args.output_dir))
    for path in found:
        try:
            if sharded.is_sharded(path):  # its shards are read straight into the model
                return str(path), sharded.load_extra(path)
            checkpoint = load_checkpoint_file(path)
            model_state_dict(checkpoint, path)
            return str(path), checkpoint
        except UserError as e:
            print(f"skipping {path}: {one_line(e)}")
    if found:
        raise UserError(f"none of the checkpoints in {args.output_dir} loads ({', '.join(p.name for p in found)}); "
                        f"remove them or pass --overwrite to start afresh")
    return None, None
