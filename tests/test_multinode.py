"""Jobs that span nodes, on a two-node cluster of network namespaces (tests/slurm/cluster.sh with
MAE_SLURM_NODES=2): node0 and node1 each have an address and a slurmd of their own, their names resolve on both, and
both keep this host's hostname, which resolves to no address of theirs (so gloo's default address is of no use
across them). One torchrun per node trains as one process does on the same global batch; a SLURM job runs one task
on each node, and is preempted and requeued and resumes with every epoch logged once.

The tests skip, saying why, where SLURM is not installed, we are not root or the network namespaces cannot be
created; with MAE_REQUIRE_SLURM=1 (CI) that is a failure instead.
"""
import os
import signal
import subprocess
import sys

import pytest
import torch
from conftest import log_lines, REPO, run_program, SUBPROCESS_TIMEOUT
from test_pretrain import pinned_randomness_script, synchronised_argv
from test_slurm import CLUSTER, cluster_script, Job, running_cluster, slurm_data  # noqa: F401 (a fixture)
from util.distributed import route_interface

NODES = ("node0", "node1")  # the cluster's node names (cluster.sh)
EPOCHS = 16  # cheap (startup dominates), and time enough to preempt a job after its first epoch


@pytest.fixture(scope="module")
def cluster():
    yield from running_cluster(nodes=len(NODES))


def test_gloo_interface_without_a_route_is_left_to_gloo():
    # a loopback rendezvous (one machine) or none that resolves: gloo's own default
    assert route_interface("127.0.0.1") is None and route_interface(None) is None
    assert route_interface("no-such-host.invalid") is None


def test_starting_a_running_cluster_changes_nothing(cluster):
    again = cluster_script(len(NODES), "start", timeout=120)
    assert again.returncode == 0 and "already up" in again.stdout, again.stderr


def test_the_nodes_have_their_own_addresses_and_resolve_each_others_names(cluster):
    for node, other in (NODES, NODES[::-1]):
        shown = cluster_script(len(NODES), "exec", node, "sh", "-c", "ip -4 -o addr; getent hosts " + " ".join(NODES),
                               timeout=60, check=True).stdout.splitlines()
        interfaces = {line.split()[1]: line.split("inet ")[1].split("/")[0] for line in shown if " inet " in line}
        resolved = {line.split()[1]: line.split()[0] for line in shown if " inet " not in line}
        assert interfaces == {"lo": "127.0.0.1", "mae0": resolved[node]}, shown  # its own address only
        assert resolved[other] != resolved[node], shown


def pinned_micro_argv(imagefolder, out, batch_size):
    """test_pretrain's synchronised pretraining (every process draws the same augmentations and masks) with the
    smallest model: the last --model counts."""
    return [*synchronised_argv(imagefolder, out, batch_size), "--model", "mae_vit_micro_patch4"]


@pytest.fixture(scope="module")
def one_process_reference(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    result = run_program(pinned_randomness_script(out), *pinned_micro_argv(imagefolder, out / "run", batch_size=16),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def test_torchrun_two_nodes_two_processes_each(cluster, imagefolder, tmp_path, one_process_reference):
    """The README's multi-node command, one launcher per node, the rendezvous on node0: 4 processes of batch 4 train
    as one process of batch 16 (the same loss and gradient norm every step; a rank that kept its own gradients would
    log its own norm, and the second epoch's loss would follow), gloo on each node's own interface."""
    out = tmp_path / "out"
    script, argv = pinned_randomness_script(tmp_path), pinned_micro_argv(imagefolder, out, batch_size=4)
    launchers = [subprocess.Popen(
        [CLUSTER, "exec", node, sys.executable, "-m", "torch.distributed.run",
         "--nnodes=2", f"--node_rank={rank}", "--nproc_per_node=2", "--master_addr=node0", "--master_port=29500",
         script, *argv],
        cwd=REPO, env={**os.environ, "MAE_SLURM_NODES": "2", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank, node in enumerate(NODES)]
    try:
        outputs = [launcher.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for launcher in launchers]
    finally:
        for launcher in launchers:  # a failed test leaves nothing running
            if launcher.poll() is None:
                launcher.terminate()
                launcher.communicate()
    assert [launcher.returncode for launcher in launchers] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    for node_rank, output in enumerate(outputs):
        for rank in (2 * node_rank, 2 * node_rank + 1):
            assert f"rank {rank}/4, gloo): env://, GLOO_SOCKET_IFNAME=mae0" in output, output[-3000:]
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]  # one step each
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]["world_size"] == 4
    for key in ("train_loss", "train_grad_norm"):
        assert [line[key] for line in log_lines(out)] == pytest.approx(
            [line[key] for line in log_lines(one_process_reference)], rel=1e-5), key


def two_node_job(cluster, data, job_dir):
    return Job(cluster, data, job_dir, EPOCHS, nodes=2, tasks_per_node=1, model="mae_vit_micro_patch4")


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, slurm_data, tmp_path_factory):
    job = two_node_job(cluster, slurm_data, tmp_path_factory.mktemp("uninterrupted") / "job")
    try:
        job.wait_until_done()
    finally:
        job.cancel()
    return job


def test_slurm_job_on_two_nodes(uninterrupted_job):
    job = uninterrupted_job
    job.check_finished()
    assert job.logged_epochs() == list(range(EPOCHS))
    for task, node in enumerate(NODES):
        out = job.stdout(task)
        assert f"task {task} of 2 on {node}, run 1" in out, job.logs()
        # the rendezvous on the job's first node, gloo on each node's own interface
        assert f"| distributed init (rank {task}/2, gloo): env://, GLOO_SOCKET_IFNAME=mae0" in out, job.logs()


@pytest.fixture
def preempted_job(cluster, slurm_data, tmp_path):
    job = two_node_job(cluster, slurm_data, tmp_path / "job")
    yield job
    job.cancel()  # a failed test leaves nothing running


def test_preempted_two_node_job_requeues_itself_and_resumes(preempted_job, uninterrupted_job):
    job = preempted_job
    logged_before = len(job.wait_for_epochs(1))
    job.signal_held_tasks(signal.SIGUSR2)  # to both nodes' tasks, as SLURM does on preemption
    job.requeue_released()
    job.wait_until_done()
    assert "this job is preempted" in job.stdout() and "Requeued job" in job.stdout(), job.logs()
    for task, node in enumerate(NODES):
        assert f"task {task} of 2 on {node}, run 2" in job.stdout(task), job.logs()
    job.check_finished()
    job.check_resumed(logged_before)
    assert job.logged_epochs() == list(range(EPOCHS))  # every epoch logged once
    job.check_same_training_as(uninterrupted_job)
