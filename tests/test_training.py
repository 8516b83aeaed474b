"""README promises checked through a program run: mixup/cutmix on soft targets, mid-epoch checkpoints and their
resume, the lr schedule as applied, pretraining's weight-decay groups, bf16 autocast and torch.compile."""
import argparse
import math
import re
import shutil
import sysconfig

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from timm.loss import SoftTargetCrossEntropy

import main_finetune
import main_pretrain
from conftest import (log_lines, run_in_process, run_program, stop_at_training,
                      StopProgram, SUBPROCESS_TIMEOUT, tiny_pretrain_argv, watch_training)
from util import lr_sched
from util.errors import UserError
from util.runtime import compile_unavailable, wrap_model


def finetune_argv(data_path, output_dir, *extra):
    return ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(data_path), "--nb_classes", "2",
            "--epochs", "1", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0", "--aa", "none",
            "--reprob", "0", "--output_dir", str(output_dir), "--log_dir", str(output_dir), "--print_freq", "5",
            *map(str, extra)]




# ------------------------------------------------------------------ mixup / cutmix
def test_mixup_and_cutmix_train_on_mixed_soft_targets(imagefolder, tmp_path, monkeypatch):
    """--mixup/--cutmix: the criterion is SoftTargetCrossEntropy, and what reaches it are mixed images with mixed,
    label-smoothed targets (timm's Mixup pairs image i with image N-1-i)."""
    batches = []

    def record_mixup(seen):
        mixup_fn = seen["kwargs"]["mixup_fn"]

        def recording(samples, targets):
            before = samples.clone()  # Mixup mixes in place
            mixed, soft = mixup_fn(samples, targets)
            batches.append((before, targets.clone(), mixed.clone(), soft.clone()))
            return mixed, soft

        seen["replace_kwargs"] = {"mixup_fn": recording}

    seen = watch_training(monkeypatch, main_finetune, record_mixup)
    out = tmp_path / "ft"
    run_in_process(main_finetune, finetune_argv(imagefolder, out, "--mixup", "0.8", "--cutmix", "1.0", "--smoothing",
                                                "0.1"))
    assert isinstance(seen["kwargs"]["criterion"], SoftTargetCrossEntropy)
    assert len(batches) == 2  # 16 images, batches of 8
    off, on = 0.1 / 2, 1 - 0.1 + 0.1 / 2  # label smoothing 0.1 over 2 classes
    same_class_rows = mixed_rows = 0
    for before, labels, mixed, soft in batches:
        assert soft.shape == (8, 2) and soft.dtype.is_floating_point
        torch.testing.assert_close(soft.sum(1), torch.ones(8))
        assert soft.min() >= off - 1e-6 and soft.max() <= on + 1e-6
        assert not torch.equal(mixed, before)  # the images were mixed too
        for i in range(8):
            if labels[i] == labels[7 - i]:  # mixing two images of one class: that class's smoothed one-hot
                expected = torch.full((2,), off)
                expected[labels[i]] = on
                torch.testing.assert_close(soft[i], expected)
                same_class_rows += 1
            elif soft[i].min() > off + 1e-3:
                mixed_rows += 1
    assert same_class_rows and mixed_rows
    assert math.isfinite(log_lines(out)[-1]["train_loss"])


def test_mixup_with_an_odd_batch_size_is_a_one_line_error(imagefolder, tmp_path):
    result = run_program("main_finetune.py", *finetune_argv(imagefolder, tmp_path, "--batch_size", "7", "--mixup", "0.8"),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "--batch_size must be even, got 7" in result.stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------ mid-epoch checkpoints
class LossRecorder:
    """Every loss the pretraining model computes, in order (a forward hook on the model main_pretrain builds);
    with ``stop_after`` = n, the run stops with StopProgram at the forward after the n-th."""

    def __init__(self, monkeypatch):
        self.losses, self.stop_after = [], None
        build_model = main_pretrain.build_model

        def build(*args, **kwargs):
            model = build_model(*args, **kwargs)
            model.register_forward_hook(self.hook)
            return model

        monkeypatch.setattr(main_pretrain, "build_model", build)

    def hook(self, module, inputs, output):
        if self.stop_after is not None and len(self.losses) == self.stop_after:
            raise StopProgram
        self.losses.append(output[0].item())


def check_mid_epoch_resume(imagefolder, tmp_path, monkeypatch):
    """--save_every_iters 2 with 16 images in batches of 4 (4 steps per epoch): a run stopped during epoch 1's third
    step resumes from the checkpoint written after its second, and ends with the losses and weights of the run that
    was never stopped."""
    def argv(out, *extra):
        return tiny_pretrain_argv(imagefolder, out, "--batch_size", "4", "--save_every_iters", "2",
                                  "--warmup_epochs", "1", "--vis_freq", "0", *extra)

    recorder = LossRecorder(monkeypatch)
    run_in_process(main_pretrain, argv(tmp_path / "full"))
    full = recorder.losses
    assert len(full) == 8

    stopped = tmp_path / "stopped"
    recorder.losses, recorder.stop_after = [], 6
    with pytest.raises(StopProgram):
        run_in_process(main_pretrain, argv(stopped))
    assert recorder.losses == full[:6]
    checkpoint = torch.load(stopped / "checkpoint-last.pth", weights_only=True)
    assert (checkpoint["epoch"], checkpoint["next_step"]) == (1, 2)

    recorder.losses, recorder.stop_after = [], None
    run_in_process(main_pretrain, argv(stopped, "--auto_resume"))
    assert recorder.losses == full[6:]  # bit for bit: the same images, masks and weights at each step
    assert [line["epoch"] for line in log_lines(stopped)] == [0, 1]
    a = torch.load(tmp_path / "full" / "checkpoint-last.pth", weights_only=True)
    b = torch.load(stopped / "checkpoint-last.pth", weights_only=True)
    assert a["epoch"] == b["epoch"] == 1 and "next_step" not in b
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for index, state in a["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][name]), (index, name)


def test_resuming_a_mid_epoch_checkpoint_is_bit_identical(imagefolder, tmp_path, monkeypatch):
    """The sampler's skip, the step count, the optimizer and every RNG the steps draw from continue exactly."""
    check_mid_epoch_resume(imagefolder, tmp_path, monkeypatch)


# ------------------------------------------------------------------ the learning-rate schedule
def test_warmup_cosine_schedule_and_blr_scaling_as_pretraining_applies_them(imagefolder, tmp_path, monkeypatch):
    """lr = blr x batch x accum_iter x processes / 256; per iteration, linear warmup from 0, then a half-cycle
    cosine down to --min_lr; set on the first micro-step of each update. Checked against the lr logged per step
    (TensorBoard) and the lr of every group at each optimizer step."""
    applied = []

    def record_steps(seen):
        seen["optimizer"].register_step_pre_hook(
            lambda optimizer, args, kwargs: applied.append([group["lr"] for group in optimizer.param_groups]))

    watch_training(monkeypatch, main_pretrain, record_steps)
    out = tmp_path / "out"
    run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, out, "--batch_size", "4", "--accum_iter", "2",
                                                     "--blr", "0.256", "--min_lr", "1e-4", "--epochs", "3",
                                                     "--warmup_epochs", "1", "--vis_freq", "0"))
    peak = 0.256 * 4 * 2 / 256

    def formula(t):  # t in epochs
        if t < 1:
            return peak * t / 1
        return 1e-4 + (peak - 1e-4) * 0.5 * (1 + math.cos(math.pi * (t - 1) / (3 - 1)))

    # 16 images in batches of 4: 4 micro-steps per epoch, updates after micro-steps 1 and 3
    expected = {}
    for epoch in range(3):
        for step in range(4):
            expected[int((step / 4 + epoch) * 1000)] = formula(epoch + (step - step % 2) / 4)
    events = EventAccumulator(str(out))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("lr")}
    assert sorted(logged) == sorted(expected)
    for x, value in expected.items():
        assert logged[x] == pytest.approx(value, rel=1e-6, abs=1e-12), x
    assert len(applied) == 6
    for lrs, t in zip(applied, [epoch + step / 4 for epoch in range(3) for step in (0, 2)]):
        assert lrs == pytest.approx([formula(t)] * len(lrs), rel=1e-12, abs=1e-15), t
    assert max(logged.values()) == pytest.approx(peak, rel=1e-6)  # reached at the end of warmup


# ------------------------------------------------------------------ weight decay in pretraining
def test_pretraining_decays_no_tokens_norms_or_biases(imagefolder, tmp_path, monkeypatch):
    """The optimizer main_pretrain builds: weight decay on the weight matrices only; the class and mask tokens,
    norms and biases get none (the fixed sin-cos tables are not trained at all). Observed too: one AdamW step with
    zero gradients only decays, so those stay exactly as they were and the matrices shrink by 1 - lr x wd."""
    seen = stop_at_training(monkeypatch, main_pretrain)
    with pytest.raises(StopProgram):
        run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, tmp_path, "--weight_decay", "0.05", "--lr", "1.0",
                                                         "--warmup_epochs", "0", "--vis_freq", "0"))
    model, optimizer, args = seen["model"], seen["optimizer"], seen["args"]
    params = dict(model.named_parameters())
    trainable = {name for name, p in params.items() if p.requires_grad}
    assert "pos_embed" not in trainable and "decoder_pos_embed" not in trainable
    group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    assert sorted(group_of) == sorted(id(params[name]) for name in trainable)
    no_decay = {name for name in trainable if params[name].ndim <= 1 or name in ("cls_token", "mask_token")}
    assert {"cls_token", "mask_token", "norm.weight", "decoder_norm.bias", "blocks.0.attn.qkv.bias",
            "patch_embed.proj.bias"} <= no_decay
    for name in trainable:
        assert group_of[id(params[name])]["weight_decay"] == (0.0 if name in no_decay else 0.05), name

    before = {name: p.detach().clone() for name, p in params.items()}
    for name in trainable:
        params[name].grad = torch.zeros_like(params[name])
    lr = lr_sched.adjust_learning_rate(optimizer, 0.0, args)
    assert lr == 1.0
    optimizer.step()
    for name in trainable:
        if name in no_decay:
            assert torch.equal(params[name], before[name]), name
        else:
            torch.testing.assert_close(params[name].detach(), before[name] * (1 - lr * 0.05), msg=name)


# ------------------------------------------------------------------ precision and compilation
def test_pretraining_under_bf16_autocast(imagefolder, tmp_path, monkeypatch):
    """--amp bf16 on CPU: the blocks compute in bfloat16 (autocast), the loss is finite, the weights stay fp32."""
    dtypes = []
    build_model = main_pretrain.build_model

    def build(*args, **kwargs):
        model = build_model(*args, **kwargs)
        model.blocks[0].attn.qkv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return model

    monkeypatch.setattr(main_pretrain, "build_model", build)
    out = tmp_path / "out"
    run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, out, "--amp", "bf16", "--epochs", "1",
                                                     "--max_train_images", "8", "--vis_freq", "0"))
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert math.isfinite(log_lines(out)[-1]["train_loss"])
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert checkpoint["args"]["amp"] == "bf16"
    assert all(v.dtype == torch.float32 for v in checkpoint["model"].values())


@pytest.mark.skipif(compile_unavailable() is not None, reason=str(compile_unavailable()))
def test_pretraining_with_compile(imagefolder, tmp_path, monkeypatch):
    """--compile on the smallest model, one step: the program trains the compiled module, the loss is finite and the
    checkpoint holds the plain model's keys."""
    seen = watch_training(monkeypatch, main_pretrain)
    out = tmp_path / "out"
    try:
        run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, out, "--model", "mae_vit_micro_patch4", "--compile",
                                                         "--epochs", "1", "--max_train_images", "8", "--vis_freq", "0"))
    finally:
        torch._dynamo.reset()
    assert hasattr(seen["model"], "_orig_mod")  # what train_one_epoch ran is torch.compile's wrapper
    assert math.isfinite(log_lines(out)[-1]["train_loss"])
    checkpoint = torch.load(out / "checkpoint-last.pth", weights_only=True)
    assert "blocks.0.attn.qkv.weight" in checkpoint["model"]
    assert not any(key.startswith(("_orig_mod.", "module.")) for key in checkpoint["model"])


def test_compile_without_a_cpp_compiler_is_one_clear_error(monkeypatch):
    """Without a C++ compiler torch.compile would fail inside the first step with a long compiler traceback."""
    monkeypatch.setattr(shutil, "which", lambda name: None)
    args = argparse.Namespace(grad_ckpt=False, distributed=False, compile=True)
    with pytest.raises(UserError, match=r"^--compile: .* needs a C\+\+ compiler, and none is installed; run without"):
        wrap_model(torch.nn.Linear(2, 2), args, torch.device("cpu"))


def test_compile_without_python_headers_is_one_clear_error(tmp_path, monkeypatch):
    """inductor's generated C++ includes Python.h: without Python's headers (Debian's python3-dev) it fails to build."""
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")  # a C++ compiler, whatever the host has
    real_get_path = sysconfig.get_path
    monkeypatch.setattr(sysconfig, "get_path", lambda name, *a, **k: str(tmp_path) if name == "include"
                        else real_get_path(name, *a, **k))
    args = argparse.Namespace(grad_ckpt=False, distributed=False, compile=True)
    expected = rf"^--compile: .* includes Python.h, which is not in {re.escape(str(tmp_path))} \(Debian: apt-get"
    with pytest.raises(UserError, match=expected):
        wrap_model(torch.nn.Linear(2, 2), args, torch.device("cpu"))
