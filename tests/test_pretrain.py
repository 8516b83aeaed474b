"""main_pretrain.py end to end on tiny data: runs, torchrun, accumulation, exact resume, clear errors."""
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
from conftest import log_lines, REPO, run_program, SUBPROCESS_TIMEOUT, tiny_pretrain_argv
from engine import train_one_epoch
from util.amp import GradientUpdater
from util.datasets import build_dataset, build_transform
from util.loader import build_loader
from util.runtime import build_model


def pretrain_in_process(argv):
    args = main_pretrain.get_args_parser().parse_args(argv)
    main_pretrain.main(args)
    return args



def test_short_pretraining_run_writes_checkpoints_and_log(imagefolder, tmp_path):
    out = tmp_path / "out"
    pretrain_in_process(tiny_pretrain_argv(imagefolder, out, "--save_freq", "1"))
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(torch.isfinite(torch.tensor(line["train_loss"])) for line in lines)
    assert {"train_loss", "train_lr"} <= set(lines[0])
    # plain weights_only loading, no allow-list: args is a plain dict
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert set(checkpoint) >= {"model", "optimizer", "epoch", "scaler", "args"}
    assert checkpoint["epoch"] == 1 and isinstance(checkpoint["args"], dict)
    assert checkpoint["args"]["input_size"] == 32
    assert checkpoint["model"]["pos_embed"].shape == (1, 65, 192)  # --input_size reached the model
    assert (out / "checkpoint-0.pth").is_file() and (out / "checkpoint-1.pth").is_file()
    assert list(out.glob("events.out.tfevents.*"))


def test_torchrun_two_processes_gloo(imagefolder, tmp_path, one_process_reference):
    """Two processes of batch 8 train as one of batch 16: DDP averages the gradients (each rank alone would end with
    other weights); one log and one set of checkpoints, from rank 0."""
    out = tmp_path / "out"
    result = run_program("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                         pinned_randomness_script(tmp_path), *synchronised_argv(imagefolder, out, batch_size=8),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "rank 1/2, gloo" in result.stdout or "rank 1/2, gloo" in result.stderr
    assert len(log_lines(out)) == 2  # one log, written by rank 0 only
    assert sorted(p.name for p in out.glob("*.pth")) == ["checkpoint-0.pth", "checkpoint-1.pth", "checkpoint-last.pth"]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]["world_size"] == 2
    # rank 0 alone prints progress
    assert result.stdout.count("Averaged stats") == 2
    assert_trained_like_one_process(out, one_process_reference)


def test_resume_after_epoch_k_is_bit_identical(imagefolder, tmp_path):
    full = tmp_path / "full"
    pretrain_in_process(tiny_pretrain_argv(imagefolder, full, "--epochs", "3", "--save_freq", "1", "--warmup_epochs", "1"))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(full / "checkpoint-0.pth", resumed / "checkpoint-last.pth")  # as if the run had stopped after epoch 0
    pretrain_in_process(tiny_pretrain_argv(imagefolder, resumed, "--epochs", "3", "--warmup_epochs", "1", "--auto_resume"))
    a = torch.load(full / "checkpoint-last.pth", weights_only=True)
    b = torch.load(resumed / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 2
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    assert [line["epoch"] for line in log_lines(resumed)] == [1, 2]
    assert [line["train_loss"] for line in log_lines(resumed)] == [line["train_loss"] for line in log_lines(full)[1:]]


class CountingNoSync(torch.nn.Module):
    """Stands in for DDP: records which micro-steps ran inside ``no_sync``."""

    def __init__(self, module):
        super().__init__()
        self.module = module
        self.in_no_sync = False
        self.calls, self.samples = [], []

    def forward(self, samples, *args, **kwargs):
        self.calls.append(self.in_no_sync)
        self.samples.append(samples.clone())
        return self.module(samples, *args, **kwargs)

    def no_sync(self):
        import contextlib

        @contextlib.contextmanager
        def ctx():
            self.in_no_sync = True
            yield
            self.in_no_sync = False
        return ctx()


class FixedMaskMAE(torch.nn.Module):
    """The model with a mask fixed by each image, so different batchings see the same masks."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, samples, mask_ratio):
        noise = samples[:, 0, 0, :].repeat(1, 2)[:, :64] + torch.arange(64) * 1e-3
        return self.model(samples, mask_ratio, noise=noise)


def one_epoch(imagefolder, batch_size, accum_iter, images=8, wrap=None):
    """Parameter change after one epoch of plain SGD (lr 1), and the number of optimizer steps taken."""
    args = main_pretrain.get_args_parser().parse_args(tiny_pretrain_argv(imagefolder, "", "--batch_size", batch_size,
                                                                         "--accum_iter", accum_iter))
    args.lr, args.min_lr, args.warmup_epochs, args.epochs, args.amp = 1.0, 1.0, 0, 1, "none"
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=32, depth=2, decoder_depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dataset = torch.utils.data.Subset(build_dataset("train", args, build_transform("eval", args)), range(images))
    loader = build_loader(dataset, args, train=True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    runner = wrap(FixedMaskMAE(model)) if wrap else FixedMaskMAE(model)
    train_one_epoch(runner, loader, optimizer, torch.device("cpu"), 0, GradientUpdater("none", torch.device("cpu")), args)
    return {k: before[k] - v for k, v in model.state_dict().items()}, runner, len(steps)


def test_accumulating_2x4_gives_the_gradients_of_batch_8(imagefolder):
    full, _, _ = one_epoch(imagefolder, 8, 1)
    accumulated, runner, _ = one_epoch(imagefolder, 4, 2, wrap=CountingNoSync)
    assert runner.calls == [True, False]  # the first micro-step skips the all-reduce, the update step syncs
    for key in full:
        assert torch.allclose(full[key], accumulated[key], atol=1e-6), key
    assert any(full[key].abs().sum() > 0 for key in full)


def test_leftover_micro_batches_make_no_update(imagefolder):
    """As the original: 3 micro-batches with --accum_iter 2 make one update, from the first two only."""
    change, runner, steps = one_epoch(imagefolder, 4, 2, images=12, wrap=CountingNoSync)
    assert steps == 1
    assert runner.calls == [True, False, True]  # the leftover micro-step never all-reduces either
    torch.manual_seed(0)
    model = build_model("mae_vit_tiny_patch4", img_size=32, depth=2, decoder_depth=1)
    model.train()
    for samples in runner.samples[:2]:
        (FixedMaskMAE(model)(samples, 0.75)[0] / 2).backward()
    for name, param in model.named_parameters():
        expected = param.grad if param.grad is not None else torch.zeros_like(param)
        assert torch.allclose(change[name], expected, atol=1e-6), name


def one_line_error(result):
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    return lines[-1]


@pytest.mark.parametrize("extra,expected", [
    (["--input_size", "30"], "not divisible by the patch size"),
    (["--mask_ratio", "1.0"], "--mask_ratio must be in [0, 1)"),
    (["--model", "mae_vit_gigantic"], "unknown model 'mae_vit_gigantic'"),
    (["--dataset", "mnist"], "invalid choice: 'mnist'"),
])
def test_bad_flags_give_one_line_errors(imagefolder, tmp_path, extra, expected):
    result = run_program("main_pretrain.py", *tiny_pretrain_argv(imagefolder, tmp_path / "out"), *extra)
    assert expected in one_line_error(result)


def test_missing_and_empty_split_directories_are_named(tmp_path):
    result = run_program("main_pretrain.py", *tiny_pretrain_argv(tmp_path / "nowhere", tmp_path / "out"))
    assert "nowhere/train" in one_line_error(result)
    (tmp_path / "empty" / "train").mkdir(parents=True)
    result = run_program("main_pretrain.py", *tiny_pretrain_argv(tmp_path / "empty", tmp_path / "out"))
    assert "empty/train" in one_line_error(result)


def test_unreadable_image_names_the_file(imagefolder, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(imagefolder, data)
    bad = data / "train" / "class_01" / "img_003.jpg"
    bad.write_bytes(b"\xff\xd8 this is no jpeg")
    for workers in ("0", "2"):  # also when the error comes from a DataLoader worker process
        result = run_program("main_pretrain.py", *tiny_pretrain_argv(data, tmp_path / "out"), "--num_workers", workers)
        assert str(bad) in one_line_error(result)


def test_non_finite_loss_stops_naming_epoch_and_step_and_keeps_the_last_checkpoint(imagefolder, tmp_path):
    out = tmp_path / "out"
    pretrain_in_process(tiny_pretrain_argv(imagefolder, out, "--epochs", "1"))
    good = torch.load(out / "checkpoint-last.pth", weights_only=True)
    result = run_program("main_pretrain.py", *tiny_pretrain_argv(imagefolder, out, "--epochs", "3", "--auto_resume",
                                                                 "--lr", "1e38", "--warmup_epochs", "0"))
    message = one_line_error(result)
    assert "loss is not finite at epoch 1, step" in message and "checkpoint-last.pth" in message
    kept = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert kept["epoch"] == 0
    assert all(torch.equal(kept["model"][k], good["model"][k]) for k in good["model"])
    assert [line["epoch"] for line in log_lines(out)] == [0]


def test_total_norm_is_the_same_with_and_without_torch_get_total_norm(monkeypatch):
    from util.amp import total_norm

    tensors = [torch.randn(3, 4), torch.randn(7), torch.randn(2, 2, 2)]
    expected = torch.cat([t.flatten() for t in tensors]).norm()
    assert torch.allclose(total_norm(tensors), expected)
    monkeypatch.delattr(torch.nn.utils, "get_total_norm", raising=False)  # torch < 2.6
    assert torch.allclose(total_norm(tensors), expected)


def test_torchrun_two_nodes_static_rendezvous(imagefolder, tmp_path, one_process_reference):
    """Multi-node as users launch it: one torchrun per node, --nnodes 2 --node_rank K --master_addr/--master_port
    (both "nodes" on this host, one process each): one log and one set of checkpoints, from global rank 0, and the
    gradients averaged across the nodes (the same weights as one process of the global batch)."""
    out = tmp_path / "out"
    outputs = launch_two_nodes(pinned_randomness_script(tmp_path), synchronised_argv(imagefolder, out, batch_size=8))
    assert "rank 0/2, gloo" in outputs[0] and "rank 1/2, gloo" in outputs[1]
    assert "Averaged stats" in outputs[0] and "Averaged stats" not in outputs[1]  # only global rank 0 prints
    assert [line["epoch"] for line in log_lines(out)] == [0, 1]
    assert torch.load(out / "checkpoint-last.pth", weights_only=True)["args"]["world_size"] == 2
    assert_trained_like_one_process(out, one_process_reference)


def launch_two_nodes(script, argv, attempts=3):
    """Both launchers of a 2-node static rendezvous on this host; returns their outputs. The master port must be
    known to both before either starts, so it is picked free and released; should another process take it in that
    moment, the launch is retried on a new port."""
    for attempt in range(attempts):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={rank}",
                                   "--nproc_per_node=1", "--master_addr=127.0.0.1", f"--master_port={port}",
                                   str(script), *argv],
                                  cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for rank in (0, 1)]
        try:
            outputs = [node.communicate(timeout=SUBPROCESS_TIMEOUT)[0] for node in nodes]
        finally:
            for node in nodes:
                if node.poll() is None:
                    node.kill()
                    node.communicate()
        port_taken = any(re.search(r"address already in use|EADDRINUSE", o, re.IGNORECASE) for o in outputs)
        if [node.returncode for node in nodes] == [0, 0] or not port_taken or attempt + 1 == attempts:
            break
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    return outputs


# ------------------------------------------------------------------ gradient synchronisation across processes
# main_pretrain.py with its per-process random draws pinned, so that 2 processes of batch 8 and 1 of batch 16 see the
# same images and masks: the augmentation becomes the evaluation transform, and each image's mask comes from its own
# pixels instead of the process's RNG (each rank seeds its RNG with seed + rank). Everything else is the program.
# The data then match: DistributedSampler draws one permutation per epoch from seed + epoch whatever the world size,
# rank r takes its items r, r + W, ...; with 16 images an epoch is one step, and the two ranks' batches of 8 are
# together the one process's batch of 16. The initial weights match too: DDP broadcasts rank 0's, and rank 0 seeds
# as the one process does. With every image masking the same number of patches, the mean of the two ranks' mean
# losses is the mean loss over 16, so averaged gradients give the one process's update up to rounding; a rank that
# kept its own gradients would end elsewhere (and rank 1 would keep its own initial weights).
PINNED_RANDOMNESS = """
import sys
sys.path.insert(0, {repo!r})
import torch
import torch.nn.functional as F

import main_finetune
import main_linprobe
import main_pretrain
import models_mae
from util.cli import run
from util.datasets import build_transform

main_pretrain.build_transform = lambda kind, args: build_transform("eval", args)
forward = models_mae.MaskedAutoencoderViT.forward


def forward_with_masks_from_pixels(self, imgs, mask_ratio=0.75, noise=None):
    noise = F.adaptive_avg_pool2d(imgs.mean(1, keepdim=True), self.patch_embed.grid_size).flatten(1)
    return forward(self, imgs, mask_ratio, noise + torch.arange(noise.shape[1]) * 1e-4)


models_mae.MaskedAutoencoderViT.forward = forward_with_masks_from_pixels
run(main_pretrain.main, main_pretrain.get_args_parser().parse_args())
"""


def pinned_randomness_script(directory):
    path = directory / "pretrain_pinned.py"
    path.write_text(PINNED_RANDOMNESS.format(repo=str(REPO)))
    return path


def synchronised_argv(imagefolder, out, batch_size):
    # 2 epochs of one step each at a constant lr: big enough steps to tell averaged gradients from one rank's
    return tiny_pretrain_argv(imagefolder, out, "--batch_size", batch_size, "--warmup_epochs", "0", "--lr", "1e-3",
                              "--min_lr", "1e-3", "--vis_freq", "0")


@pytest.fixture(scope="module")
def one_process_reference(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    result = run_program(pinned_randomness_script(out), *synchronised_argv(imagefolder, out / "run", batch_size=16),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    return out / "run"


def assert_trained_like_one_process(out, reference):
    """The same losses and the same gradients as the one-process run. The gradients are read from AdamW's moments in
    the checkpoints (after the first step exp_avg = 0.1 g, exp_avg_sq = 0.001 g^2): the weights themselves cannot
    be compared element by element, because Adam's first steps move every element by about lr x sign(g), and some
    gradients are pure rounding noise (a key bias shifts all of a query's logits alike: its true gradient is 0)."""
    assert [line["train_loss"] for line in log_lines(out)] == pytest.approx(
        [line["train_loss"] for line in log_lines(reference)], rel=1e-5)
    for name in ("checkpoint-0.pth", "checkpoint-last.pth"):
        ours = torch.load(out / name, weights_only=True)
        theirs = torch.load(reference / name, weights_only=True)
        states = ours["optimizer"]["state"], theirs["optimizer"]["state"]
        assert states[0].keys() == states[1].keys() and len(states[0]) > 100
        for index in states[1]:
            for moment in ("exp_avg", "exp_avg_sq"):
                expected = states[1][index][moment]
                torch.testing.assert_close(states[0][index][moment], expected, rtol=1e-3,
                                           atol=1e-3 * expected.abs().max().item(), msg=f"{name} {moment} {index}")
        # and nearly every weight is the same (those that are not have gradients of rounding noise)
        same = sum(torch.isclose(ours["model"][k], theirs["model"][k], rtol=1e-5, atol=1e-6).sum().item()
                   for k in theirs["model"])
        assert same > 0.999 * sum(v.numel() for v in theirs["model"].values())


@pytest.mark.parametrize("program,flag,value", [
    (main_pretrain, "--batch_size", "0"), (main_pretrain, "--accum_iter", "0"), (main_pretrain, "--epochs", "0"),
    (main_pretrain, "--input_size", "-32"), (main_pretrain, "--num_workers", "-1"), (main_pretrain, "--save_freq", "0"),
    (main_pretrain, "--print_freq", "0"), (main_pretrain, "--vis_images", "0"), (main_finetune, "--nb_classes", "0"),
    (main_finetune, "--epochs", "0"), (main_linprobe, "--batch_size", "-4"),
])
def test_counts_that_make_no_sense_are_one_line_usage_errors(program, flag, value, capsys):
    with pytest.raises(SystemExit) as stop:
        program.get_args_parser().parse_args(["--data_path", "x", flag, value])
    assert stop.value.code == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert f"argument {flag}: must be at least" in line and f"got {value}" in line
