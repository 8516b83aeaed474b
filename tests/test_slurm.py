"""The SLURM launchers (submitit_*.py, util/launcher.py): the sbatch parameters they submit, and real jobs on a
single-node SLURM cluster brought up by tests/slurm/cluster.sh -- a 2-task CPU pretraining run, and runs that
are preempted (USR2, as before a time limit or on preemption) or requeued by SLURM mid-training and must
resume from their last checkpoint.

The cluster tests skip, saying why, where SLURM is not installed or we are not root; with MAE_REQUIRE_SLURM=1
(CI) that is a failure instead.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import REPO, run_program

from util import sharded

CLUSTER = REPO / "tests" / "slurm" / "cluster.sh"
REQUIRE_SLURM = os.environ.get("MAE_REQUIRE_SLURM") == "1"
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED", "GONE"}
JOB_TIMEOUT = 420  # s; generous: other tests may be loading this machine's cores


# ---------------------------------------------------------------- without SLURM: the sbatch parameters
def test_dry_run_prints_the_sbatch_parameters(tmp_path):
    job_dir = tmp_path / "jobs" / "%j"
    result = run_program("submitit_pretrain.py", "--nodes", "1", "--ngpus", "0", "--tasks_per_node", "2",
                         "--partition", "debug", "--model", "mae_vit_tiny_patch4", "--input_size", "32",
                         "--data_path", tmp_path / "data", "--epochs", "3", "--num_workers", "0",
                         "--job_dir", job_dir, "--dry_run", timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for line in ("#SBATCH --ntasks-per-node=2", "#SBATCH --partition=debug", "#SBATCH --nodes=1",
                 "#SBATCH --cpus-per-task=1", "#SBATCH --signal=USR2@120", "#SBATCH --time=4320",
                 "#SBATCH --job-name=mae_pretrain"):
        assert line in lines, f"{line!r} not in\n{result.stdout}"
    assert "--gpus-per-node" not in result.stdout  # --ngpus 0: a CPU job
    assert f"export PYTHONPATH={REPO}" in result.stdout  # the job imports util.launcher and main_pretrain
    # then the command: this interpreter (the same virtual environment) runs main_pretrain.main in the job dir
    assert lines[-1] == f"# command (srun, every task): {sys.executable} running main_pretrain.main(args), " \
                        f"output in {job_dir}"
    assert "nothing submitted" in result.stderr
    assert not (tmp_path / "jobs").exists()  # nothing submitted, nothing written


@pytest.mark.parametrize("program", ["main_pretrain", "main_finetune", "main_linprobe"])
def test_launcher_takes_the_programs_flags(program, tmp_path, capsys):
    from util.launcher import build_parser, submit

    args = build_parser(program).parse_args(
        ["--nodes", "2", "--ngpus", "4", "--partition", "gpu", "--account", "acc", "--qos", "high",
         "--use_volta32", "--comment", "a b", "--timeout", "90", "--epochs", "7", "--num_workers", "3",
         "--job_dir", str(tmp_path / "j"), "--dry_run"])
    submit(program, args)
    script = capsys.readouterr().out.splitlines()
    for line in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=4", "#SBATCH --ntasks-per-node=4",
                 "#SBATCH --cpus-per-task=4", "#SBATCH --mem=160GB", "#SBATCH --time=90", "#SBATCH --account=acc",
                 "#SBATCH --qos=high", "#SBATCH --constraint=volta32gb", "#SBATCH --comment='a b'",
                 f"#SBATCH --job-name=mae_{program.removeprefix('main_')}"):
        assert line in script
    # what the job will run with
    assert (args.device, args.epochs, args.auto_resume) == ("cuda", 7, True)
    assert args.output_dir == args.log_dir == str(tmp_path / "j")


@pytest.mark.parametrize("program", ["main_pretrain", "main_finetune", "main_linprobe"])
def test_help_lists_the_slurm_flags_and_says_where_output_goes(program):
    from util.launcher import build_parser

    text = " ".join(build_parser(program).format_help().split())
    flags = set(re.findall(r"--\w+", text))
    for flag in ("--nodes", "--ngpus", "--tasks_per_node", "--cpus_per_task", "--mem_gb", "--timeout", "--partition",
                 "--account", "--qos", "--constraint", "--exclude", "--comment", "--job_dir", "--dry_run",
                 "--epochs", "--data_path", "--save_every_iters"):  # the last three: the program's own
        assert flag in flags
    assert f"usage: submitit_{program.removeprefix('main_')}.py" in text
    # the program's --output_dir/--log_dir/--device/--resume/--auto_resume work differently in a job: the epilog
    assert "log.txt, TensorBoard and SLURM logs all go to --job_dir (--output_dir and --log_dir are not accepted)" in text
    assert "--device defaults to cuda with --ngpus N and to cpu with --ngpus 0" in text
    assert "--auto_resume is always on" in text and "resumes from JOB_DIR/checkpoint-last.pth" in text
    assert "--resume only seeds the first run" in text


def test_rendezvous_is_the_jobs_first_node(monkeypatch):
    from util.distributed import slurm_master_addr

    for nodelist, first in (("node7", "node7"), ("gpu[003-005,9],cpu1", "gpu003"),
                            ("rack1-gpu[12-15]-ib,login", "rack1-gpu12-ib")):
        monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
        assert slurm_master_addr() == first


def test_launcher_rejects_conflicting_flags():
    result = run_program("submitit_pretrain.py", "--ngpus", "0", "--device", "cuda", "--dry_run", timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == "error: --ngpus 0 runs on CPU: drop --device cuda, or ask for GPUs with --ngpus N"
    from util.errors import UserError
    from util.launcher import build_parser, resolve_args

    parser = build_parser("main_pretrain")
    for argv, message in ((["--output_dir", "x"], "everything goes to --job_dir"),
                          (["--ngpus", "2", "--tasks_per_node", "4"], "each process needs its own GPU"),
                          (["--nodes", "0"], "--nodes must be at least 1")):
        with pytest.raises(UserError, match=message):
            resolve_args(parser.parse_args(argv))


def test_checkpoint_requeues_a_fresh_copy_of_the_job():
    import argparse

    import submitit

    from util.launcher import Trainer

    args = argparse.Namespace(epochs=5, resume="")
    requeued = Trainer("main_pretrain", args).checkpoint()
    assert isinstance(requeued, submitit.helpers.DelayedSubmission)
    assert isinstance(requeued.function, Trainer) and requeued.function.program == "main_pretrain"
    assert requeued.function.args is args and not requeued.args


# ---------------------------------------------------------------- the real cluster
def _missing_slurm() -> str:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    if not (shutil.which("sbatch", path=path) and shutil.which("slurmctld", path=path)):
        return "SLURM is not installed (apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "the test cluster must be started as root (slurmd runs jobs as their user)"
    return ""


def cluster_script(nodes, *argv, **kwargs):
    """``tests/slurm/cluster.sh argv...`` for the test cluster of ``nodes`` nodes."""
    return subprocess.run([CLUSTER, *map(str, argv)], env={**os.environ, "MAE_SLURM_NODES": str(nodes)},
                          capture_output=True, text=True, **kwargs)


def running_cluster(nodes):
    """Environment for SLURM clients (SLURM_CONF, the sacct stand-in on PATH) of the test cluster of ``nodes`` nodes,
    for a fixture to ``yield from``: starts the cluster and stops it afterwards, unless it was already up."""
    reason = _missing_slurm()
    if reason and not (REQUIRE_SLURM and os.geteuid() == 0):  # as root, cluster.sh start installs SLURM itself
        if REQUIRE_SLURM:
            pytest.fail(f"MAE_REQUIRE_SLURM=1 but {reason}")
        pytest.skip(f"{reason}; set MAE_REQUIRE_SLURM=1 to make this a failure")
    was_up = cluster_script(nodes, "status").returncode == 0
    started = cluster_script(nodes, "start", timeout=600)
    if started.returncode != 0:
        message = f"tests/slurm/cluster.sh start ({nodes} node(s)) failed:\n{started.stdout}{started.stderr[-3000:]}"
        if REQUIRE_SLURM:
            pytest.fail(message)
        pytest.skip(message)
    try:
        shell = f'eval "$({CLUSTER} env)" && printf "%s\\n%s" "$SLURM_CONF" "$PATH"'
        conf, path = subprocess.run(["bash", "-c", shell], env={**os.environ, "MAE_SLURM_NODES": str(nodes)},
                                    capture_output=True, text=True, check=True).stdout.split("\n")
        yield {"SLURM_CONF": conf, "PATH": path}
    finally:
        if not was_up:
            cluster_script(nodes, "stop", timeout=120)


@pytest.fixture(scope="module")
def slurm_env():
    yield from running_cluster(nodes=1)


@pytest.fixture(scope="module")
def slurm_data(tmp_path_factory):
    from fakedata import make_imagefolder

    # 32 images: two iterations per epoch on two tasks of batch 8
    return make_imagefolder(tmp_path_factory.mktemp("slurm_data"), num_classes=2, per_class=16, size=32)


class Job:
    """A job submitted through submitit_pretrain.py, and what the tests look at."""

    def __init__(self, env, data_path, job_dir, epochs, nodes=1, tasks_per_node=2, model="mae_vit_tiny_patch4",
                 extra=()):
        self.env, self.dir, self.epochs = env, Path(job_dir), epochs
        result = run_program("submitit_pretrain.py", "--nodes", nodes, "--ngpus", "0", "--tasks_per_node",
                             tasks_per_node, "--partition", "debug", "--timeout", "60",  # >10 min: USR2 = preemption
                             "--model", model, "--input_size", "32", "--data_path", data_path,
                             "--epochs", epochs, "--batch_size", "8", "--device", "cpu", "--amp", "none",
                             "--num_workers", "0", "--print_freq", "1", "--job_dir", job_dir, *extra, env=env,
                             timeout=120)
        assert result.returncode == 0, result.stderr
        match = re.search(r"submitted job (\d+)", result.stdout)
        assert match, result.stdout
        self.id = match.group(1)
        assert f"stdout: {job_dir}/{self.id}_0_log.out" in result.stdout
        assert f"stderr: {job_dir}/{self.id}_0_log.err" in result.stdout

    def slurm(self, *argv, check=True):
        return subprocess.run(list(argv), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60, check=check)

    def state(self):
        """(JobState, Reason); GONE once slurmctld has forgotten the job."""
        out = self.slurm("scontrol", "-o", "show", "job", self.id, check=False).stdout
        state, reason = re.search(r"JobState=(\S+)", out), re.search(r"Reason=(\S+)", out)
        return (state.group(1) if state else "GONE"), (reason.group(1) if reason else "")

    def wait_for(self, what, done, timeout=JOB_TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.state()
            if done(state):
                return state
            if state[0] in TERMINAL:
                pytest.fail(f"job {self.id} ended ({state[0]}) while waiting for {what}\n{self.logs()}")
            time.sleep(0.5)
        pytest.fail(f"job {self.id}: no {what} after {timeout}s (state {self.state()})\n{self.logs()}")

    def wait_for_epochs(self, n):
        """n epochs in log.txt and a checkpoint to resume from (an epoch's line is written before its checkpoint)."""
        deadline = time.monotonic() + JOB_TIMEOUT
        while time.monotonic() < deadline:
            if len(self.logged_epochs()) >= n and (self.dir / "checkpoint-last.pth").is_file():
                return self.logged_epochs()
            if self.state()[0] in TERMINAL:
                break
            time.sleep(0.2)
        pytest.fail(f"job {self.id}: log.txt never showed {n} epoch(s)\n{self.logs()}")

    def requeue_released(self):
        """Wait for the requeued job to be PENDING (SLURM holds it ~2 min) and release it at once."""
        self.wait_for("PENDING after the requeue", lambda s: s[0] == "PENDING", timeout=180)
        self.slurm("scontrol", "update", f"JobId={self.id}", "StartTime=now")

    def wait_until_done(self):
        state = self.wait_for("the end", lambda s: s[0] in TERMINAL)
        assert state[0] in ("COMPLETED", "GONE"), f"job {self.id} ended {state}\n{self.logs()}"

    def logged_epochs(self):
        path = self.dir / "log.txt"
        if not path.is_file():
            return []
        return [json.loads(line)["epoch"] for line in path.read_text().splitlines() if line.strip()]

    def stdout(self, task=0):
        path = self.dir / f"{self.id}_{task}_log.out"
        return path.read_text() if path.is_file() else ""

    def logs(self):
        parts = []
        for path in sorted(self.dir.glob(f"{self.id}_*_log.*")):
            parts.append(f"----- {path.name} (tail) -----\n" + "\n".join(path.read_text().splitlines()[-25:]))
        return "\n".join(parts) or f"(no logs in {self.dir})"

    def cancel(self):
        self.slurm("scancel", self.id, check=False)

    def check_finished(self):
        """The final checkpoint (epoch N-1, loadable without pickled code), submitit's success record."""
        checkpoint = torch.load(self.dir / "checkpoint-last.pth", map_location="cpu", weights_only=True)
        assert checkpoint["epoch"] == self.epochs - 1
        assert checkpoint["args"]["output_dir"] == str(self.dir) and checkpoint["args"]["world_size"] == 2
        assert len(checkpoint["rng"]) == 2  # both ranks' random state
        assert (self.dir / f"{self.id}_0_result.pkl").is_file(), self.logs()

    def signal_held_tasks(self, signum):
        """What ``scancel --signal`` does (the signal to every task process, not the batch shell), with the job
        suspended meanwhile: however fast the machine, it cannot finish between the test seeing an epoch and the
        signal. (scancel itself waits on a suspended job.)"""
        self.slurm("scontrol", "suspend", self.id)
        nodes = re.search(r"\bNodeList=(\S+)", self.slurm("scontrol", "-o", "show", "job", self.id).stdout).group(1)
        for node in self.slurm("scontrol", "show", "hostnames", nodes).stdout.split():
            listed = self.slurm("scontrol", "listpids", self.id, node).stdout.splitlines()[1:]  # that node's processes
            for row in map(str.split, listed):
                if len(row) >= 3 and row[2] not in ("batch", "extern"):
                    os.kill(int(row[0]), signum)
        self.slurm("scontrol", "resume", self.id)

    def check_same_training_as(self, reference):
        """The resumed run trained exactly as an uninterrupted one: the same loss every epoch, the same weights and
        optimizer state at the end (model, optimizer and every rank's RNG came back from the checkpoint)."""
        losses = {}
        for line in (self.dir / "log.txt").read_text().splitlines():
            record = json.loads(line)
            losses[record["epoch"]] = record["train_loss"]  # an epoch logged twice: the rerun's counts
        expected = {json.loads(line)["epoch"]: json.loads(line)["train_loss"]
                    for line in (reference.dir / "log.txt").read_text().splitlines()}
        assert losses == expected
        ours, theirs = (torch.load(job.dir / "checkpoint-last.pth", map_location="cpu", weights_only=True)
                        for job in (self, reference))
        for key, value in theirs["model"].items():
            assert torch.equal(ours["model"][key], value), key
        for index, state in theirs["optimizer"]["state"].items():
            for name, value in state.items():
                assert torch.equal(ours["optimizer"]["state"][index][name], value), (index, name)

    def check_resumed(self, logged_before):
        """The rerun resumed from the last checkpoint; no epoch ran twice but the one in flight."""
        out = self.stdout()
        assert "run 2 (requeued; resuming from" in out, self.logs()
        match = re.search(r"continuing at epoch (\d+)", out)
        assert match, self.logs()
        resumed_at = int(match.group(1))
        # at most the epoch in flight is lost: every epoch logged before the signal was checkpointed, but the last
        # one's checkpoint may have been in the writing (its line comes first)
        assert logged_before - 1 <= resumed_at < self.epochs
        epochs = self.logged_epochs()
        assert epochs[-1] == self.epochs - 1
        counts = Counter(epochs)
        odd = {e for e in range(self.epochs) if counts[e] != 1}
        # the only possible irregularity: the epoch at the restart, logged twice or (killed between its checkpoint
        # and its log line) not at all
        assert odd <= {resumed_at - 1, resumed_at} and len(odd) <= 1 and all(counts[e] <= 2 for e in odd), epochs
        assert set(epochs) <= set(range(self.epochs)), epochs
        # the tasks stopped with the job are not failures: no error record, no traceback
        for path in self.dir.glob(f"{self.id}_*_log.*"):
            assert "triggered an exception" not in path.read_text(), self.logs()


@pytest.fixture
def submit_job(slurm_env, slurm_data, tmp_path):
    jobs = []

    def submit(epochs):
        jobs.append(Job(slurm_env, slurm_data, tmp_path / "job", epochs))
        return jobs[-1]

    yield submit
    for job in jobs:  # a failed test leaves nothing running for the next one
        job.cancel()


EPOCHS = 12


@pytest.fixture(scope="module")
def uninterrupted_job(slurm_env, slurm_data, tmp_path_factory):
    """A job that runs its EPOCHS epochs without interruption: what the preempted ones must reproduce."""
    job = Job(slurm_env, slurm_data, tmp_path_factory.mktemp("uninterrupted"), EPOCHS)
    try:
        job.wait_until_done()
    finally:
        job.cancel()
    return job


def test_two_task_cpu_pretraining_job(uninterrupted_job):
    job = uninterrupted_job
    job.check_finished()
    assert job.logged_epochs() == list(range(EPOCHS))
    out = job.stdout()
    assert "task 0 of 2" in out and "run 1" in out and "distributed init (rank 0/2, gloo)" in out
    assert "resumed" not in out
    assert "task 1 of 2" in job.stdout(task=1)


def test_preempted_job_requeues_itself_and_resumes(submit_job, uninterrupted_job):
    job = submit_job(epochs=EPOCHS)
    logged_before = len(job.wait_for_epochs(1))
    job.signal_held_tasks(signal.SIGUSR2)  # what SLURM sends on preemption / near the time limit
    job.requeue_released()
    job.wait_until_done()
    assert "this job is preempted" in job.stdout() and "Requeued job" in job.stdout(), job.logs()
    job.check_finished()
    job.check_resumed(logged_before)
    job.check_same_training_as(uninterrupted_job)


def test_job_requeued_by_slurm_resumes(submit_job, uninterrupted_job):
    job = submit_job(epochs=EPOCHS)
    logged_before = len(job.wait_for_epochs(1))
    # the tasks are killed; no handler runs. (A suspended job is not requeued, so unlike the signal above this is
    # sent to a running job: its EPOCHS epochs leave the test time to send it.)
    job.slurm("scontrol", "requeue", job.id)
    job.requeue_released()
    job.wait_until_done()
    assert "Requeued job" not in job.stdout()
    job.check_finished()
    job.check_resumed(logged_before)
    job.check_same_training_as(uninterrupted_job)


def test_sharded_job_writes_every_tasks_shards(slurm_env, slurm_data, tmp_path):
    """--fsdp through the launcher: two SLURM tasks train one sharded model and checkpoint it with DCP."""
    job = Job(slurm_env, slurm_data, tmp_path / "job", 2, extra=["--fsdp"])
    try:
        job.wait_until_done()
    finally:
        job.cancel()
    assert job.logged_epochs() == [0, 1]
    last = job.dir / "checkpoint-last.dcp"
    assert sorted(p.name for p in last.iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp", "extra.pth"]
    assert sharded.load_extra(last)["epoch"] == 1
