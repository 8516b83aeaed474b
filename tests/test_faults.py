"""Real faults on real runs: a finished run re-entered, two runs on one directory, damaged checkpoints, a full disk,
a killed checkpoint write, a killed torchrun worker. Each ends in a correct recovery or one clear line, nothing lost."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, SUBPROCESS_TIMEOUT, log_lines, run_program, tiny_pretrain_argv

from util.checkpoint import save_atomic
from util.errors import UserError


def micro_argv(data, out, *extra):
    """The smallest real pretraining (0.5 M parameters: a checkpoint of about 6 MiB)."""
    return tiny_pretrain_argv(data, out, "--model", "mae_vit_micro_patch4", "--vis_freq", "0", *extra)


def one_line_error(result) -> str:
    assert result.returncode == 1, result.stdout[-1500:] + result.stderr[-1500:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def finished(imagefolder, tmp_path_factory):
    """A finished 2-epoch run (checkpoint-0, -1, -last and log.txt)."""
    out = tmp_path_factory.mktemp("finished") / "out"
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out))
    assert result.returncode == 0, result.stderr[-2000:]
    return out


def snapshot(out: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file() and p.name != ".lock"}


def test_rerun_into_a_finished_run_is_refused_and_changes_nothing(imagefolder, finished):
    before = snapshot(finished)
    message = one_line_error(run_program("main_pretrain.py", *micro_argv(imagefolder, finished)))
    assert f"--output_dir {finished} holds an earlier run (checkpoint-last.pth)" in message
    assert "--auto_resume" in message and "--overwrite" in message
    assert snapshot(finished) == before


def test_overwrite_starts_afresh_and_auto_resume_continues(imagefolder, finished, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in snapshot(finished).items():
        (out / name).write_bytes(data)
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", "3", "--auto_resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line["epoch"] for line in log_lines(out)] == [0, 1, 2]  # continued: epoch 2 only was trained
    assert "continuing at epoch 2" in result.stdout
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", "1", "--overwrite"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line["epoch"] for line in log_lines(out)] == [0]
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint-0.pth", "checkpoint-last.pth"]


def test_kept_checkpoint_and_checkpoint_last_do_not_share_bytes(finished):
    kept, last = finished / "checkpoint-1.pth", finished / "checkpoint-last.pth"
    assert kept.read_bytes() == last.read_bytes()
    assert not os.path.samefile(kept, last)


def test_second_run_on_the_same_directory_stops_naming_the_holder(imagefolder, tmp_path):
    out = tmp_path / "out"
    first = subprocess.Popen([sys.executable, "main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", "1000")],
                             cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + SUBPROCESS_TIMEOUT
        while not (out / "checkpoint-last.pth").exists():  # training, lock held
            assert first.poll() is None and time.time() < deadline, first.stderr.read()[-2000:]
            time.sleep(0.2)
        message = one_line_error(run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--auto_resume")))
        assert f"--output_dir {out} is in use by pid {first.pid} on " in message
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # the holder is dead: its lock went with it, and the directory can be resumed
    epochs = torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] + 2
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", epochs, "--auto_resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert [line["epoch"] for line in log_lines(out)] == list(range(epochs))  # each once, wherever the kill cut


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_checkpoint_last_falls_back_to_the_newest_that_loads(imagefolder, finished, tmp_path, damage):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in snapshot(finished).items():
        (out / name).write_bytes(data)
    (out / "checkpoint-1.pth").unlink()  # the newest intact one is now checkpoint-0
    last = out / "checkpoint-last.pth"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 3] if damage == "truncate" else os.urandom(len(data)))
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", "3", "--auto_resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"skipping {last}: cannot load checkpoint {last}: not a PyTorch checkpoint" in result.stdout
    assert "continuing at epoch 1" in result.stdout
    assert [line["epoch"] for line in log_lines(out)] == [0, 1, 2]  # epoch 1's old line dropped, logged again
    assert torch.load(last, weights_only=True)["epoch"] == 2


def test_no_loadable_checkpoint_is_one_line(imagefolder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "checkpoint-last.pth").write_bytes(b"\0" * 100)
    message = one_line_error(run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--auto_resume")))
    assert f"none of the checkpoints in {out} loads (checkpoint-last.pth)" in message


def test_orphan_temporary_files_of_a_killed_save_are_removed_at_start(imagefolder, finished, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name, data in snapshot(finished).items():
        (out / name).write_bytes(data)
    orphan = out / ".checkpoint-last.pth.k1ll3d.tmp"  # the name save_atomic's temporary files have
    orphan.write_bytes(snapshot(finished)["checkpoint-last.pth"][:1000])
    result = run_program("main_pretrain.py", *micro_argv(imagefolder, out, "--epochs", "3", "--auto_resume"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert not orphan.exists() and not list(out.glob(".*.tmp"))


def test_output_dir_that_cannot_be_created_is_one_line(imagefolder, tmp_path):
    (tmp_path / "file").write_text("x")
    message = one_line_error(run_program("main_pretrain.py", *micro_argv(imagefolder, tmp_path / "file" / "out")))
    assert f"cannot use --output_dir {tmp_path / 'file' / 'out'}: Not a directory" in message


@pytest.fixture
def small_disk(tmp_path):
    """A real 16 MiB file system (tmpfs): room for two checkpoints of the micro model (6 MiB each), not three."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_one_line_keeping_the_last_checkpoint(imagefolder, small_disk):
    out = small_disk / "out"
    argv = micro_argv(imagefolder, out, "--epochs", "3", "--save_freq", "100")
    message = one_line_error(run_program("main_pretrain.py", *argv))
    assert f"cannot write checkpoint {out / 'checkpoint-last.pth'}: no space left on the device" in message
    assert "the checkpoint needs about 6 MiB" in message
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["epoch"] == 0  # the previous one, intact
    assert not list(out.glob(".*.tmp"))


def test_save_atomic_on_a_full_disk_names_path_and_sizes(small_disk):
    save_atomic({"w": torch.zeros(2**21)}, small_disk / "a.pth")  # 8 MiB
    with pytest.raises(UserError, match=r"b.pth: no space left on the device \(\d+ MiB free, the checkpoint needs "
                                        r"about 12 MiB\)"):
        save_atomic({"w": torch.zeros(3 * 2**20)}, small_disk / "b.pth")
    assert sorted(p.name for p in small_disk.iterdir()) == ["a.pth"]


def worker_pids(parent: int) -> list:
    """Processes whose parent is ``parent`` (torchrun's workers)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            pids.append(int(stat.parent.name))
    return sorted(pids)


@pytest.mark.parametrize("launch", [[], ["--master_port", "0"], ["--standalone"]],
                         ids=["default", "port", "standalone"])
def test_torchrun_restart_after_a_killed_worker_resumes_the_run(imagefolder, tmp_path, launch):
    """``kill -9`` of one of two workers mid-run: torchrun restarts both, they re-form the process group (whatever the
    rendezvous flags) and continue from the run's last checkpoint; every epoch is logged once."""
    out = tmp_path / "out"
    if launch[:1] == ["--master_port"]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            launch = ["--master_port", str(s.getsockname()[1])]
    script = tmp_path / "pretrain.py"  # after the restart rank 1 meets the store first, as it may on a busy machine
    script.write_text(f"import os, runpy, sys, time\nsys.path.insert(0, {str(REPO)!r})\n"
                      "if os.environ['TORCHELASTIC_RESTART_COUNT'] == '1' and os.environ['RANK'] == '0':\n"
                      "    time.sleep(3)\n"
                      f"runpy.run_path({str(REPO / 'main_pretrain.py')!r}, run_name='__main__')\n")
    command = [sys.executable, "-m", "torch.distributed.run", *launch, "--nproc_per_node=2", "--max-restarts=1",
               str(script), *micro_argv(imagefolder, out, "--epochs", "6", "--batch_size", "2")]
    run = subprocess.Popen(command, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + SUBPROCESS_TIMEOUT
        while not (out / "log.txt").exists() or not (out / "checkpoint-last.pth").exists():
            assert run.poll() is None and time.time() < deadline, run.stdout.read()[-3000:]
            time.sleep(0.1)
        workers = worker_pids(run.pid)
        assert len(workers) == 2
        os.kill(workers[-1], signal.SIGKILL)
        output, _ = run.communicate(timeout=SUBPROCESS_TIMEOUT)
    finally:
        run.kill()
    assert run.returncode == 0, output[-3000:]
    assert "continuing at epoch" in output  # the restarted workers resumed instead of starting over
    assert [line["epoch"] for line in log_lines(out)] == list(range(6))
