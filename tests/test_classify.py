"""Fine-tuning and linear probing on tiny data: learning, frozen encoders, layer decay, LARS, eval, dist_eval."""
import json
import re

import pytest
import timm
import torch

import main_finetune
import main_linprobe
import main_pretrain
import models_vit  # noqa: F401
from conftest import run_program, tiny_pretrain_argv


def classifier_argv(data_path, output_dir, *extra):
    return ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(data_path), "--nb_classes", "2",
            "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--num_workers", "0",
            "--output_dir", str(output_dir), "--log_dir", str(output_dir), "--print_freq", "5", *map(str, extra)]


def in_process(module, argv):
    args = module.get_args_parser().parse_args(argv)
    module.main(args)
    return args


def log_lines(output_dir):
    return [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]


@pytest.fixture(scope="module")
def pretrained(imagefolder, tmp_path_factory):
    out = tmp_path_factory.mktemp("pretrain")
    in_process(main_pretrain, tiny_pretrain_argv(imagefolder, out, "--epochs", "1"))
    return out / "checkpoint-last.pth"


def test_finetuning_from_a_pretraining_checkpoint_beats_chance(pretrained, tmp_path):
    from fakedata import make_imagefolder

    data = make_imagefolder(tmp_path / "data", per_class=32)  # 64 images: 4 steps of 16 per epoch
    out = tmp_path / "ft"
    in_process(main_finetune, classifier_argv(data, out, "--finetune", pretrained, "--epochs", "4", "--batch_size", "16",
                                              "--lr", "1e-3", "--warmup_epochs", "1", "--aa", "none",
                                              "--reprob", "0", "--smoothing", "0", "--drop_path", "0"))
    lines = log_lines(out)
    assert [line["epoch"] for line in lines] == [0, 1, 2, 3]
    assert {"train_loss", "test_acc1", "test_acc5", "max_accuracy"} <= set(lines[-1])
    assert lines[-1]["max_accuracy"] >= 75.0  # chance is 50 %


def test_linear_probe_leaves_every_encoder_tensor_bit_identical(imagefolder, pretrained, tmp_path):
    out = tmp_path / "lp"
    in_process(main_linprobe, classifier_argv(imagefolder, out, "--finetune", pretrained, "--blr", "0.5"))
    assert "test_acc1" in log_lines(out)[-1]
    source = torch.load(pretrained, weights_only=True)["model"]
    probed = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    encoder_keys = [k for k in probed if not k.startswith("head.")]
    assert len(encoder_keys) > 100
    for key in encoder_keys:
        assert torch.equal(probed[key], source[key]), key
    # the head is BatchNorm without affine parameters + Linear, and it learned
    assert {"head.0.running_mean", "head.1.weight"} <= set(probed) and "head.0.weight" not in probed
    assert probed["head.0.running_mean"].abs().sum() > 0


def test_linear_probe_with_global_pool_learns_only_the_head(imagefolder, pretrained, tmp_path):
    out = tmp_path / "lp_gp"
    in_process(main_linprobe, classifier_argv(imagefolder, out, "--finetune", pretrained, "--global_pool", "--epochs", "1",
                                              "--warmup_epochs", "0", "--blr", "1.0"))
    probed = torch.load(out / "checkpoint-last.pth", weights_only=True)["model"]
    source = torch.load(pretrained, weights_only=True)["model"]
    # fc_norm keeps its initial affine (the BatchNorm after it would cancel any change), the encoder is untouched
    assert torch.equal(probed["fc_norm.weight"], torch.ones(192)) and torch.equal(probed["fc_norm.bias"], torch.zeros(192))
    assert "norm.weight" not in probed
    assert torch.equal(probed["blocks.11.mlp.fc2.weight"], source["blocks.11.mlp.fc2.weight"])
    assert probed["head.0.running_mean"].abs().sum() > 0


def test_partial_finetuning_trains_only_the_last_blocks(imagefolder, pretrained, tmp_path):
    out = tmp_path / "partial"
    in_process(main_finetune, classifier_argv(imagefolder, out, "--finetune", pretrained, "--trainable_blocks", "2",
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


def test_layer_decay_groups_match_the_original_formula_for_vit_base():
    from timm.optim import param_groups_layer_decay

    with torch.device("meta"):
        model = timm.create_model("vit_base_patch16", num_classes=1000)
    groups = param_groups_layer_decay(model, 0.05, no_weight_decay_list=model.no_weight_decay(), layer_decay=0.65)
    by_param = {id(p): g for g in groups for p in g["params"]}
    num_layers = len(model.blocks) + 1
    checked = 0
    for name, param in model.named_parameters():
        group = by_param[id(param)]
        expected_scale = 0.65 ** (num_layers - original_layer_id(name, num_layers))
        expected_decay = 0.0 if (param.ndim == 1 or name in ("pos_embed", "cls_token")) else 0.05
        assert group["lr_scale"] == pytest.approx(expected_scale, rel=1e-12), name
        assert group["weight_decay"] == expected_decay, name
        checked += 1
    assert checked == 152
    assert len({round(g["lr_scale"], 12) for g in groups}) == num_layers + 1  # 14 distinct scales for ViT-B


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
    in_process(main_finetune, classifier_argv(imagefolder, out, "--finetune", pretrained, "--epochs", "1",
                                              "--aa", "none", "--reprob", "0"))
    logged = log_lines(out)[-1]["test_acc1"]
    result = run_program("main_finetune.py", *classifier_argv(imagefolder, tmp_path / "eval", "--eval", "--resume",
                                                              out / "checkpoint-last.pth"))
    assert result.returncode == 0, result.stderr[-2000:]
    acc1 = float(re.search(r"\* Acc@1 ([\d.]+)", result.stdout).group(1))
    assert acc1 == pytest.approx(logged, abs=1e-3)


def test_dist_eval_under_torchrun_two_processes(imagefolder, pretrained, tmp_path):
    out = tmp_path / "dist"
    result = run_program("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "main_finetune.py",
                         *classifier_argv(imagefolder, out, "--finetune", pretrained, "--epochs", "1", "--dist_eval"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "(16 images)" in result.stdout  # the 16 validation images, 8 per rank, summed over both
    lines = log_lines(out)
    assert len(lines) == 1 and 0.0 <= lines[0]["test_acc1"] <= 100.0


def test_eval_without_resume_and_too_few_classes_are_one_line_errors(imagefolder, tmp_path):
    result = run_program("main_finetune.py", *classifier_argv(imagefolder, tmp_path, "--eval"))
    assert result.returncode != 0 and "--eval evaluates the checkpoint given with --resume" in result.stderr
    argv = classifier_argv(imagefolder, tmp_path)
    argv[argv.index("--nb_classes") + 1] = "1"
    result = run_program("main_linprobe.py", *argv)
    assert result.returncode != 0 and "smaller than the 2 classes" in result.stderr
    assert "Traceback" not in result.stderr
