"""Fine-tuning and linear probing on tiny data: learning, frozen encoders, layer decay, LARS, eval, dist_eval."""
import re

import pytest
import torch

import main_finetune
import main_linprobe
import main_pretrain
import models_vit  # noqa: F401
from conftest import (log_lines, run_in_process, run_program, stop_at_training,
                      StopProgram, SUBPROCESS_TIMEOUT, tiny_pretrain_argv, watch_training)
from util import lr_sched


def classifier_argv(data_path, output_dir, *extra):
    return ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(data_path), "--nb_classes", "2",
            "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0",
            "--output_dir", str(output_dir), "--log_dir", str(output_dir), "--print_freq", "5", *map(str, extra)]




@pytest.fixture(scope="module")
def pretrained(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, out, "--epochs", "1"))
    return out / "checkpoint-last.pth"


def test_finetuning_from_a_pretraining_checkpoint_beats_chance(pretrained, tmp_path, monkeypatch):
    from fakedata import make_imagefolder

    data = make_imagefolder(tmp_path / "data", per_class=32)  # 64 images: 4 steps of 16 per epoch
    out = tmp_path / "ft"
    seen = watch_training(monkeypatch, main_finetune)
    run_in_process(main_finetune, classifier_argv(data, out, "--finetune", pretrained, "--epochs", "4", "--batch_size", "16",
                                              "--lr", "1e-3", "--warmup_epochs", "1", "--aa", "none",
                                              "--reprob", "0", "--smoothing", "0", "--drop_path", "0"))
    # training started from the checkpoint's encoder: every encoder tensor as saved, before the first update
    source = torch.load(pretrained, weights_only=True)["model"]
    initial = seen["initial"]
    encoder_keys = [k for k in initial if not k.startswith(("head.", "fc_norm."))]
    assert len(encoder_keys) > 100 and set(encoder_keys) <= set(source)
    for key in encoder_keys:
        assert torch.equal(initial[key], source[key]), key
    assert initial["head.weight"].std() < 1e-4  # the new head: trunc-normal, std 2e-5
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    assert {"train_loss", "test_acc1", "test_acc5", "max_accuracy"} <= set(lines[-1])
    assert lines[-1]["max_accuracy"] >= 75.0  # chance is 50 %


def assert_only_the_linear_head_learned(probed, source, initial):
    """Every encoder tensor of the probed model is the checkpoint's, bit for bit; the Linear head's weight and bias
    moved away from their values as training started. (BatchNorm's running mean moves even at learning rate 0, so
    it proves nothing about learning.)"""
    encoder_keys = [k for k in probed if not k.startswith(("head.", "fc_norm."))]
    assert len(encoder_keys) > 100 and set(encoder_keys) <= set(source)
    for key in encoder_keys:
        assert torch.equal(probed[key], source[key]), key
    assert {"head.0.running_mean", "head.1.weight", "head.1.bias"} <= set(probed) and "head.0.weight" not in probed
    for key in ("head.1.weight", "head.1.bias"):
        # LARS (trust 0.001) moves the weight by only ~1e-3 x lr of its norm per step, but at learning rate 0 (or
        # with the head out of the optimizer) it would stay bit-identical
        assert not torch.equal(probed[key], initial[key]), f"{key} did not learn"


def test_linear_probe_leaves_every_encoder_tensor_bit_identical(imagefolder, pretrained, tmp_path, monkeypatch):
    out = tmp_path / "lp"
    seen = watch_training(monkeypatch, main_linprobe)
    run_in_process(main_linprobe, classifier_argv(imagefolder, out, "--finetune", pretrained, "--blr", "0.5"))
    assert "test_acc1" in log_lines(out)[-1]
    source = torch.load(pretrained, weights_only=True)["model"]
    probed = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    # the head is BatchNorm without affine parameters + Linear, and only its Linear learned
    assert_only_the_linear_head_learned(probed, source, seen["initial"])


def test_linear_probe_with_global_pool_learns_only_the_head(imagefolder, pretrained, tmp_path, monkeypatch):
    out = tmp_path / "lp_gp"
    seen = watch_training(monkeypatch, main_linprobe)
    run_in_process(main_linprobe, classifier_argv(imagefolder, out, "--finetune", pretrained, "--global_pool", "--epochs", "1",
                                              "--warmup_epochs", "0", "--blr", "1.0"))
    probed = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    source = torch.load(pretrained, weights_only=True)["model"]
    # fc_norm keeps its initial affine (the BatchNorm after it would cancel any change), the encoder is untouched
    assert torch.equal(probed["fc_norm.weight"], torch.ones(192)) and torch.equal(probed["fc_norm.bias"], torch.zeros(192))
    assert "norm.weight" not in probed
    assert_only_the_linear_head_learned(probed, source, seen["initial"])


def test_partial_finetuning_trains_only_the_last_blocks(imagefolder, pretrained, tmp_path):
    out = tmp_path / "partial"
    run_in_process(main_finetune, classifier_argv(imagefolder, out, "--finetune", pretrained, "--trainable_blocks", "2",
                                              "--epochs", "1", "--blr", "1e-2", "--warmup_epochs", "0"))
    source = torch.load(pretrained, weights_only=True)["model"]
    tuned = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    for key in ("patch_embed.proj.weight", "cls_token", "pos_embed", "blocks.0.attn.qkv.weight", "blocks.9.mlp.fc1.weight"):
        assert torch.equal(tuned[key], source[key]), key
    for key in ("blocks.10.attn.qkv.weight", "blocks.11.mlp.fc1.weight", "fc_norm.weight"):
        assert not torch.equal(tuned[key], source.get(key, torch.ones_like(tuned[key]))), key


def original_layer_id(name, num_layers):
    """The original code's layer id for layer-wise lr decay."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks"):
        return int(name.split(".")[1]) + 1
    return num_layers


@pytest.mark.parametrize("pooling", ["--cls_token", "--global_pool"])
def test_layer_decay_reaches_each_parameter_update_as_main_finetune_builds_it(imagefolder, tmp_path, monkeypatch,
                                                                               pooling):
    """The optimizer main_finetune builds (util.lr_decay groups, util.runtime.adamw), its lr set by
    util.lr_sched.adjust_learning_rate, takes one step from weights all 1 with gradients of +1 and -1 in turn.
    AdamW's first step moves each element by lr x lr_scale x (sign(g) + weight_decay) (m / sqrt(v) = sign(g);
    decoupled decay on a weight of 1), so the two kinds of elements give each parameter's lr scale and weight decay
    as the update sees them: the original's layer ids, the final norm (--cls_token) and fc_norm/head at scale 1."""
    seen = stop_at_training(monkeypatch, main_finetune)
    with pytest.raises(StopProgram):
        run_in_process(main_finetune, classifier_argv(imagefolder, tmp_path, pooling, "--lr", "1.0", "--warmup_epochs", "1",
                                                  "--layer_decay", "0.75", "--weight_decay", "0.05"))
    model, optimizer, args = seen["model"], seen["optimizer"], seen["args"]
    names = dict(model.named_parameters())
    assert ("norm.weight" in names) == (pooling == "--cls_token") and ("fc_norm.weight" in names) == (pooling != "--cls_token")
    in_groups = [id(p) for g in optimizer.param_groups for p in g["params"]]
    assert sorted(in_groups) == sorted(id(p) for p in names.values() if p.requires_grad)  # each once
    with torch.no_grad():
        for param in names.values():
            param.fill_(1.0)
            param.grad = torch.ones_like(param)
            param.grad.view(-1)[1::2] = -1.0
    lr = lr_sched.adjust_learning_rate(optimizer, args.warmup_epochs, args)  # the end of warmup: the peak
    assert lr == 1.0
    optimizer.step()
    num_layers = len(model.blocks) + 1
    scales = set()
    for name, param in names.items():
        expected_scale = 0.75 ** (num_layers - original_layer_id(name, num_layers))
        expected_decay = 0.0 if (param.ndim == 1 or name in ("pos_embed", "cls_token")) else 0.05
        change = (param.detach() - 1.0).view(-1)
        down, up = change[0].item(), change[1].item()  # the elements with gradient +1 and -1
        scale, decay = (up - down) / (2 * lr), -(up + down) / (up - down)
        assert scale == pytest.approx(expected_scale, rel=1e-4), name
        assert decay == pytest.approx(expected_decay, abs=1e-4), name
        expected = -lr * expected_scale * (param.grad.view(-1) + expected_decay)
        torch.testing.assert_close(change, expected, rtol=1e-4, atol=1e-6, msg=name)
        scales.add(round(expected_scale, 9))
    assert len(scales) == num_layers + 1  # 14 distinct scales for a 12-block ViT


def original_lars_step(params, lr, momentum=0.9, trust=0.001, weight_decay=0.0):
    """The original code's LARS update, written out for comparison."""
    for p in params:
        dp = p.grad
        if p.ndim > 1:
            dp = dp.add(p, alpha=weight_decay)
            param_norm, update_norm = torch.norm(p), torch.norm(dp)
            one = torch.ones_like(param_norm)
            q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, trust * param_norm / update_norm, one), one)
            dp = dp.mul(q)
        state = p.__dict__.setdefault("_mu", torch.zeros_like(p))
        state.mul_(momentum).add_(dp)
        p.data.add_(state, alpha=-lr)


def test_lars_param_groups_reproduce_the_original_lars():
    from timm.optim import Lars

    torch.manual_seed(0)
    head = torch.nn.Sequential(torch.nn.BatchNorm1d(8, affine=False), torch.nn.Linear(8, 3))
    reference = [p.detach().clone().requires_grad_(True) for p in head.parameters()]
    optimizer = Lars(main_linprobe.lars_param_groups(head, 0.0), lr=0.1, momentum=0.9, trust_coeff=0.001, eps=0.0)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in head.parameters()]
        for p, g, r in zip(head.parameters(), grads, reference):
            p.grad, r.grad = g.clone(), g.clone()
        optimizer.step()
        with torch.no_grad():
            original_lars_step(reference, lr=0.1)
    for p, r in zip(head.parameters(), reference):
        assert torch.allclose(p, r, atol=1e-7, rtol=1e-6)


def test_eval_of_a_saved_finetuned_checkpoint_reproduces_its_logged_accuracy(imagefolder, pretrained, tmp_path):
    out = tmp_path / "ft"
    run_in_process(main_finetune, classifier_argv(imagefolder, out, "--finetune", pretrained, "--epochs", "1",
                                              "--aa", "none", "--reprob", "0"))
    logged = log_lines(out)[-1]["test_acc1"]
    result = run_program("main_finetune.py", *classifier_argv(imagefolder, tmp_path / "eval", "--eval", "--resume",
                                                              out / "checkpoint-last.pth"),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-2000:]
    acc1 = float(re.search(r"\* Acc@1 ([\d.]+)", result.stdout).group(1))
    assert acc1 == pytest.approx(logged, abs=1e-3)


@pytest.mark.parametrize("program", [main_finetune, main_linprobe], ids=["finetune", "linprobe"])
def test_eval_freq_evaluates_every_nth_epoch_and_after_the_last(program, imagefolder, pretrained, tmp_path,
                                                                monkeypatch):
    evaluated = []
    real_evaluate = program.evaluate
    monkeypatch.setattr(program, "evaluate", lambda *a, **k: evaluated.append(1) or real_evaluate(*a, **k))
    out = tmp_path / "run"
    run_in_process(program, classifier_argv(imagefolder, out, "--finetune", pretrained, "--epochs", "3",
                                            "--eval_freq", "2", "--warmup_epochs", "0"))
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2]
    assert ["test_acc1" in line for line in lines] == [False, True, True]  # the 2nd epoch and the last
    assert len(evaluated) == 2


def test_dist_eval_under_torchrun_two_processes(imagefolder, pretrained, tmp_path, capsys):
    out = tmp_path / "dist"
    result = run_program("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_finetune.py",
                         *classifier_argv(imagefolder, out, "--finetune", pretrained, "--epochs", "1", "--dist_eval"),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(16 images)" in result.stdout  # the 16 validation images, 8 per rank, summed over both
    lines = log_lines(out)
    assert len(lines) == 1
    # the sharded evaluation gives what one process evaluating the same checkpoint gives (16 images split evenly:
    # no padding, so exactly the same images are counted)
    run_in_process(main_finetune, classifier_argv(imagefolder, tmp_path / "eval", "--eval", "--resume",
                                              out / "checkpoint-last.pth"))
    acc1, loss = re.search(r"\* Acc@1 ([\d.]+) Acc@5 [\d.]+ loss ([\d.]+) \(16 images\)", capsys.readouterr().out).groups()
    assert lines[0]["test_acc1"] == pytest.approx(float(acc1), abs=1e-9)  # a multiple of 6.25: printed exactly
    assert lines[0]["test_loss"] == pytest.approx(float(loss), abs=1e-3)


def test_eval_without_resume_and_too_few_classes_are_one_line_errors(imagefolder, tmp_path):
    result = run_program("main_finetune.py", *classifier_argv(imagefolder, tmp_path, "--eval"), timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode != 0 and "--eval evaluates the checkpoint given with --resume" in result.stderr
    argv = classifier_argv(imagefolder, tmp_path)
    argv[argv.index("--nb_classes") + 1] = "1"
    result = run_program("main_linprobe.py", *argv, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode != 0 and "smaller than the 2 classes" in result.stderr
    assert "Traceback" not in result.stderr
