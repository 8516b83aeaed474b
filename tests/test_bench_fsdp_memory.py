"""benchmarks/fsdp_memory.py: its byte counts against the model's parameters, its FSDP2 shard sizes against what
``fully_shard`` really allocates (one process standing in for each rank of a fake process group), and its claim
that DDP's default buckets are a second copy of the gradients."""
import importlib.util
import json

import pytest
import timm
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.testing._internal.distributed.fake_pg import FakeStore

import models_mae  # noqa: F401  (registers the mae_vit_* models)
from conftest import REPO, run_program

MODEL = "mae_vit_micro_patch4"  # 0.5 M parameters; dim 0 of 1, 16, 96, 288 rows...: uneven shards for W = 5


def load_fsdp_memory():
    spec = importlib.util.spec_from_file_location("fsdp_memory", REPO / "benchmarks" / "fsdp_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def meta_model():
    with torch.device("meta"):
        return timm.create_model(MODEL)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_memory") / "out.json"
    result = run_program("benchmarks/fsdp_memory.py", "--models", MODEL, "--input_size", "28", "--world_sizes",
                         "1", "2", "5", "--check_ddp_buckets", "--json", out, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert MODEL in result.stdout and "activations excluded" in result.stdout
    return json.loads(out.read_text())


def rows(report, mode):
    return {r["world_size"]: r for r in report["rows"] if r["mode"] == mode}


def test_ddp_holds_20_bytes_per_trained_parameter_and_4_per_frozen_one(report):
    model = meta_model()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen > 0  # the sin-cos position tables
    for row in rows(report, "ddp").values():
        assert row["total"] == 20 * trained + 4 * frozen
        assert row["ddp_buckets"] == row["grads"] == 4 * trained


def test_fsdp_holds_a_world_size_th_of_the_state_up_to_the_padding(report):
    model = meta_model()
    unsharded = 16 * sum(p.numel() for p in model.parameters() if p.requires_grad) + 4 * sum(
        p.numel() for p in model.parameters() if not p.requires_grad)
    most_padding = 16 * sum(p[0].numel() for p in model.parameters())  # at most one dim-0 row more per parameter
    for mode in ("fsdp", "fsdp-bf16"):
        for world_size, row in rows(report, mode).items():
            state = row["params"] + row["grads"] + row["adamw_moments"]
            assert unsharded / world_size <= state <= unsharded / world_size + most_padding
            assert row["ddp_buckets"] == 0
    assert rows(report, "fsdp")[1]["params"] == 4 * sum(p.numel() for p in model.parameters())
    for world_size in (1, 2, 5):  # bf16 all-gathers move half the bytes; the sharded state is the same
        fp32, bf16 = rows(report, "fsdp")[world_size], rows(report, "fsdp-bf16")[world_size]
        assert bf16["gathered"] * 2 == fp32["gathered"] > 0
        assert bf16["total"] - bf16["gathered"] == fp32["total"] - fp32["gathered"]


@pytest.mark.parametrize("world_size", [2, 4, 5])
def test_shard_sizes_are_those_fully_shard_allocates_on_rank_0(world_size):
    dist.init_process_group("fake", rank=0, world_size=world_size, store=FakeStore())
    try:
        model = meta_model()
        expected = load_fsdp_memory().count(model, "fsdp", world_size)["params"]
        for block in [*model.blocks, *model.decoder_blocks]:
            fully_shard(block)
        fully_shard(model)
        assert 4 * sum(p.to_local().numel() for p in model.parameters()) == expected
    finally:
        dist.destroy_process_group()


def test_ddp_default_buckets_are_a_second_copy_of_the_gradients(report):
    check = report["ddp_buckets_check"]
    copy, view = check["gradient_as_bucket_view=False"], check["gradient_as_bucket_view=True"]
    for found in (copy, view):
        assert found["bucket_elements"] == found["param_elements"] and found["buckets_kept_across_steps"]
    assert not copy["grads_are_views_of_buckets"] and view["grads_are_views_of_buckets"]
