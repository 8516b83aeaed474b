"""--fsdp on CPU processes (gloo): the same training as DDP, sharded checkpoints (DCP) resumed on another number of
processes, consolidated into the original layout, and read without running pickled code."""
import os
import pickle
import shutil

import pytest
import torch
from conftest import SUBPROCESS_TIMEOUT, log_lines, run_program
from test_pretrain import pinned_randomness_script, synchronised_argv

from util import sharded
from util.checkpoint import load_checkpoint_file
from util.errors import UserError
from util.runtime import build_model


def torchrun(script, argv, processes=2):
    result = run_program("-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", script, *argv,
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def losses(out):
    return [line["train_loss"] for line in log_lines(out)]


@pytest.fixture(scope="module")
def runs(imagefolder, tmp_path_factory):
    """4 epochs (one step each: 16 images, 8 per process) under FSDP and under DDP, and FSDP stopped after 2; the
    masks come from the pixels, so the data each step sees does not depend on the number of processes."""
    root = tmp_path_factory.mktemp("fsdp")
    script = pinned_randomness_script(root)
    out = {name: root / name for name in ("fsdp", "ddp", "fsdp_2_epochs")}
    # with the figures and the kNN monitor, whose forward passes every rank must join under FSDP
    torchrun(script, [*synchronised_argv(imagefolder, out["fsdp"], 8), "--epochs", "4", "--fsdp", "--vis_freq", "2",
                      "--knn_freq", "2"])
    torchrun(script, [*synchronised_argv(imagefolder, out["ddp"], 8), "--epochs", "4"])
    torchrun(script, [*synchronised_argv(imagefolder, out["fsdp_2_epochs"], 8), "--epochs", "2", "--fsdp"])
    return script, out


def test_fsdp_trains_as_ddp(runs):
    """Tolerance 1e-5 relative: both are fp32; FSDP reduce-scatters where DDP all-reduces, which changes only the
    order of the additions (rounding of the order of 1e-7 per step)."""
    _, out = runs
    assert len(losses(out["fsdp"])) == 4
    assert [line["epoch"] for line in log_lines(out["fsdp"]) if "knn_acc1" in line] == [0, 2, 3]
    assert sorted(p.name for p in (out["fsdp"] / "vis").iterdir()) == ["epoch_0000.png", "epoch_0002.png",
                                                                       "epoch_0003.png"]
    assert losses(out["fsdp"]) == pytest.approx(losses(out["ddp"]), rel=1e-5)
    assert sorted(p.name for p in out["fsdp"].glob("checkpoint-*")) == [
        "checkpoint-0.dcp", "checkpoint-3.dcp", "checkpoint-last.dcp"]
    assert sorted(p.name for p in (out["fsdp"] / "checkpoint-last.dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pth"]  # one shard file per process


@pytest.mark.parametrize("processes", [1, 2])
def test_sharded_checkpoint_resumes_on_another_number_of_processes(imagefolder, runs, tmp_path, processes):
    """Stopped after 2 epochs by 2 processes, continued by 1 (a group of one) or 2: DCP reshards the model and the
    optimizer, and the last two epochs' losses are those of the uninterrupted run."""
    script, out = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(out["fsdp_2_epochs"], resumed)
    argv = [*synchronised_argv(imagefolder, resumed, 16 // processes), "--epochs", "4", "--fsdp", "--auto_resume"]
    if processes == 1:
        result = run_program(script, *argv, timeout=SUBPROCESS_TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        result = torchrun(script, argv)
    assert "continuing at epoch 2" in result.stdout
    assert [line["epoch"] for line in log_lines(resumed)] == [0, 1, 2, 3]
    assert losses(resumed) == pytest.approx(losses(out["fsdp"]), rel=1e-5)


def test_consolidated_checkpoint_loads_strictly_in_the_original_layout(runs, tmp_path):
    _, out = runs
    result = run_program("export.py", "--checkpoint", out["fsdp"] / "checkpoint-last.dcp", "--format", "pth",
                         "--output_dir", tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    checkpoint = torch.load(tmp_path / "checkpoint.pth", weights_only=True)
    assert checkpoint["epoch"] == 3 and checkpoint["args"]["fsdp"] is True
    model = build_model("mae_vit_tiny_patch4", img_size=32)
    model.load_state_dict(checkpoint["model"])  # strict
    # the same weights as the sharded directory, read by every program that takes weights
    direct = load_checkpoint_file(out["fsdp"] / "checkpoint-last.dcp")["model"]
    assert all(torch.equal(direct[k], v) for k, v in checkpoint["model"].items())
    # and as the DDP run's, up to the rounding of the reduction order
    ddp = torch.load(out["ddp"] / "checkpoint-last.pth", weights_only=True)["model"]
    close = sum(torch.isclose(ddp[k], v, rtol=1e-4, atol=1e-6).sum().item() for k, v in checkpoint["model"].items())
    assert close > 0.999 * sum(v.numel() for v in ddp.values())


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_sharded_metadata_with_foreign_pickled_objects_is_refused(runs, tmp_path):
    _, out = runs
    evil = tmp_path / "evil.dcp"
    shutil.copytree(out["fsdp"] / "checkpoint-last.dcp", evil)
    marker = tmp_path / "pwned"
    (evil / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UserError, match="posix.system is not part of a DCP checkpoint's metadata, refused for safety"):
        load_checkpoint_file(evil)
    assert not marker.exists()


def test_a_sharded_checkpoint_cut_short_is_never_resumed_and_is_removed(imagefolder, runs, tmp_path):
    """A save killed mid-way leaves only ``.checkpoint-last.dcp.tmp``: the run resumes from the last complete one."""
    script, out = runs
    resumed = tmp_path / "resumed"
    shutil.copytree(out["fsdp_2_epochs"], resumed)
    partial = resumed / ".checkpoint-last.dcp.tmp"
    shutil.copytree(out["fsdp"] / "checkpoint-last.dcp", partial)
    (partial / "extra.pth").unlink()  # rank 0 had not finished it
    result = run_program(script, *synchronised_argv(imagefolder, resumed, 16), "--epochs", "3", "--fsdp",
                         "--auto_resume", timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "continuing at epoch 2" in result.stdout and not partial.exists()
    assert sharded.load_extra(resumed / "checkpoint-last.dcp")["epoch"] == 2


def test_fsdp_flag_in_every_program():
    for program in ("main_pretrain.py", "main_finetune.py", "main_linprobe.py"):
        result = run_program(program, "--help")
        assert "--fsdp" in result.stdout, program
