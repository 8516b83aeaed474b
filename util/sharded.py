"""``--fsdp``: the model sharded over the processes with FSDP2, and its checkpoints in torch's distributed checkpoint
format (DCP): a directory in which every rank writes its shards and which any number of processes reads back
(DCP reshards). Read with an allow-listed unpickler and ``weights_only``: a checkpoint cannot run code."""
from __future__ import annotations

import pickle
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint._nested_dict import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from util import distributed
from util.errors import UserError

EXTRA = "extra.pth"  # beside the shards: epoch, args, RNG states, written by rank 0 with torch.save


def shard(model: torch.nn.Module, amp: str) -> torch.nn.Module:
    """Each transformer block, then the rest, sharded over all processes; under ``--amp bf16`` the gathered
    parameters and the compute are bf16 while the sharded master weights and the gradient reduction stay fp32."""
    for tensor in model.state_dict().values():  # every rank starts from rank 0's initialisation, as DDP does
        torch.distributed.broadcast(tensor, src=0)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if amp == "bf16" else None, reduce_dtype=torch.float32)
    for block in [*getattr(model, "blocks", ()), *getattr(model, "decoder_blocks", ())]:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    if hasattr(model, "forward_encoder"):  # the kNN monitor's entry point gathers the parameters as forward does
        register_fsdp_forward_method(model, "forward_encoder")
    return model


def is_sharded(path) -> bool:
    return Path(path).is_dir() and (Path(path) / ".metadata").is_file()


def save(path, model, optimizer, extra: dict) -> None:
    """Every rank writes its shards into a temporary directory, which rank 0 completes with ``extra`` and then
    renames to ``path``: a checkpoint cut short is never the one resumed from. Call on every rank."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    if distributed.is_main_process():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=str(tmp))
    if distributed.is_main_process():
        torch.save(extra, tmp / EXTRA)
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    distributed.barrier()


def load_extra(path) -> dict:
    try:
        return torch.load(Path(path) / EXTRA, map_location="cpu", weights_only=True)
    except Exception as e:  # a directory cut short, a damaged file
        raise UserError(f"cannot load sharded checkpoint {path}: {EXTRA}: {str(e).splitlines()[0][:300]}") from None


def load_into(path, model, optimizer=None) -> None:
    """The model (and optimizer) state of a sharded checkpoint, resharded to this run's processes."""
    model_state, optimizer_state = get_state_dict(model, optimizer or [])
    state = {"model": model_state, **({"optimizer": optimizer_state} if optimizer else {})}
    _load(path, state)
    set_state_dict(model, optimizer or [], model_state_dict=state["model"], optim_state_dict=state.get("optimizer", {}))


def consolidated_model_state(path) -> dict:
    """The full model state dict of a sharded checkpoint, in one process: the original layout, plain tensors."""
    try:
        entries = _SafeReader(path).read_metadata().state_dict_metadata
    except (OSError, pickle.UnpicklingError, EOFError) as e:
        raise UserError(f"cannot load sharded checkpoint {path}: {str(e).splitlines()[0][:300]}") from None
    state = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
             for key, meta in entries.items() if key.startswith("model.") and hasattr(meta, "size")}
    if not state:
        raise UserError(f"{path}: a sharded checkpoint without model weights")
    _load(path, {"model": state}, single_process=True)
    return state


def _load(path, state, single_process=False):
    try:
        with warnings.catch_warnings():  # one process on purpose: no "assuming single process" warning
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(state, storage_reader=_SafeReader(path), planner=_SafePlanner(), no_dist=single_process)
    except Exception as e:  # noqa: BLE001  (DCP gathers every rank's error into one exception)
        raise UserError(f"cannot load sharded checkpoint {path}: {str(e).splitlines()[0][:300]}") from None


class _SafeReader(FileSystemReader):
    """DCP's reader with the metadata (a pickle) read by an unpickler that knows only DCP's own classes."""

    def read_metadata(self, *args, **kwargs):
        with open(Path(self.path) / ".metadata", "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        self.load_id = kwargs.get("load_id")
        return metadata


class _MetadataUnpickler(pickle.Unpickler):
    ALLOWED_MODULES = ("torch.distributed.checkpoint.", "torch.distributed._shard.", "collections", "torch._utils")

    def find_class(self, module, name):
        if module.startswith(self.ALLOWED_MODULES) or (module == "torch" and name in ("Size", *_DTYPES)) \
                or (module, name) in (("torch.serialization", "_get_layout"), ("pathlib", "PosixPath")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a DCP checkpoint's metadata, refused for safety")


_DTYPES = tuple(str(t).removeprefix("torch.") for t in vars(torch).values() if isinstance(t, torch.dtype))


class _SafePlanner(DefaultLoadPlanner):
    """DCP's planner, non-tensor values (optimizer hyperparameters) read with ``weights_only``."""

    def load_bytes(self, read_item, value):
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
