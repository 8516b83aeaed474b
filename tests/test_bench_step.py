"""The training-step benchmark and the two model options it measures ("with [M]", activation checkpointing).

Everything runs on tiny models in seconds; the real numbers come from running benchmarks/bench_step.py.
"""
import importlib.util
import json
import shutil

import pytest
import torch

import models_mae
from conftest import REPO, run_program


def tiny_mae(**kwargs):
    config = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
                  decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)
    config.update(kwargs)
    return models_mae.MaskedAutoencoderViT(**config)


def load_bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ the program
@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """One real command line on a tiny model: MAE, 'with [M]' and fine-tuning, one timed step each."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    result = run_program("benchmarks/bench_step.py", "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                         "--batch_size", "2", "--device", "cpu", "--mode", "both", "--compare_mask_tokens",
                         "--steps", "2", "--warmup", "1", "--peak_sizes", "64,128", "--peak_reps", "2",
                         "--json", out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def test_bench_step_writes_the_table_and_json_with_positive_numbers(bench_json):
    report, stdout = bench_json
    for key in ("date", "device", "device_type", "torch", "timm", "threads", "args", "peak", "runs",
                "speedup_vs_mask_tokens"):
        assert key in report, key
    assert report["device_type"] == "cpu" and report["threads"] >= 1
    assert report["peak"]["flops_per_s"] > 0 and report["peak"]["size"] in (64, 128)
    assert [r["kind"] for r in report["runs"]] == ["pretrain", "pretrain_mask_tokens", "finetune"]
    for run in report["runs"]:
        for key in ("images_per_s", "step_time_s", "flops_per_step", "flops_per_s", "fraction_of_peak"):
            assert run[key] > 0, (run["kind"], key)
        assert len(run["step_times_s"]) == 2 and run["loss_finite"]
    assert report["runs"][2]["model"] == "vit_tiny_patch4"  # the classifier twin of the MAE model
    assert "MAE pretrain" in stdout and "matmul peak" in stdout and "speedup" in stdout


def test_mae_step_counts_fewer_flops_than_the_with_mask_token_step(bench_json):
    report, _ = bench_json
    runs = {r["kind"]: r for r in report["runs"]}
    assert runs["pretrain"]["flops_per_step"] < runs["pretrain_mask_tokens"]["flops_per_step"]
    assert report["speedup_vs_mask_tokens"]["flops"] > 1


def test_flop_count_includes_attention_on_cpu():
    # FlopCounterMode alone misses the CPU flash-attention kernel; the benchmark adds its formula
    bench = load_bench_step()
    q = torch.randn(2, 2, 8, 4, requires_grad=True)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    with torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=bench.EXTRA_FLOP_FORMULAS) as counter:
        attention()
    bmm = 2 * (2 * 2) * 8 * 8 * 4  # one (batch x heads) of 8x4 @ 4x8 products
    # forward: q @ k^T and attn @ v; backward: the scores recomputed, then four products for the gradients
    assert counter.get_total_flops() == 2 * bmm + 5 * bmm


# ------------------------------------------------------------------------------------------ with [M]
def test_encoder_mask_tokens_model_runs_with_finite_loss_and_one_extra_parameter():
    torch.manual_seed(0)
    model = tiny_mae(encoder_mask_tokens=True)
    default_keys = set(tiny_mae().state_dict())
    assert set(model.state_dict()) - default_keys == {"encoder_mask_token"}
    assert default_keys == set(model.state_dict()) - {"encoder_mask_token"}
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, 0.75, noise=noise)
    assert torch.isfinite(loss) and pred.shape == (2, 16, 48)
    assert torch.equal(mask, tiny_mae()(imgs, 0.75, noise=noise)[2])  # the same noise removes the same patches
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    assert latent.shape == (2, 1 + 16, 32)  # the encoder saw every patch
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    assert not model.mask_token.requires_grad  # unused by the decoder in this mode


def test_encoder_mask_token_replaces_exactly_the_removed_patches():
    torch.manual_seed(0)
    model = tiny_mae(encoder_mask_tokens=True, depth=0)  # no blocks: the latent is the norm of the input tokens
    model.norm = torch.nn.Identity()
    imgs = torch.randn(1, 3, 16, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.5, noise=torch.rand(1, 16))
    patches = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    token = model.encoder_mask_token + model.pos_embed[:, 1:]
    removed = mask[0].bool()
    assert torch.allclose(latent[0, 1:][removed], token[0][removed])
    assert torch.allclose(latent[0, 1:][~removed], patches[0][~removed])


def test_default_model_is_unchanged_by_the_new_options():
    layout = {k: v.shape for k, v in tiny_mae().state_dict().items()}
    assert layout == {k: v.shape for k, v in tiny_mae(grad_ckpt=True).state_dict().items()}
    assert "encoder_mask_token" not in layout


# ------------------------------------------------------------------------------------------ checkpointing
def test_grad_ckpt_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = tiny_mae()
    ckpt = tiny_mae(grad_ckpt=True)
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    for blk in ckpt.blocks:  # a pre-hook: the recomputation stops early, before a block's forward ends
        blk.register_forward_pre_hook(lambda *_: calls.append(1))
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    losses = []
    for model in (plain, ckpt):
        loss = model(imgs, 0.75, noise=noise)[0]
        loss.backward()
        losses.append(loss)
    assert torch.allclose(losses[0], losses[1])
    assert len(calls) == 2 * len(ckpt.blocks)  # every encoder block ran again in the backward pass
    grads = dict(plain.named_parameters())
    for name, p in ckpt.named_parameters():
        if p.grad is None:
            assert grads[name].grad is None, name
        else:
            assert torch.allclose(p.grad, grads[name].grad, atol=1e-6), name


def test_grad_ckpt_is_off_in_eval_and_without_grad():
    model = tiny_mae(grad_ckpt=True).eval()
    calls = []
    model.blocks[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 16, 16))
    assert len(calls) == 1


# ------------------------------------------------------------------------------------------ compile
def _compiler_available():
    return torch._dynamo.is_dynamo_supported() and any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _compiler_available(), reason="torch.compile needs dynamo support and a C++ compiler")
def test_torch_compile_runs_forward_and_backward_on_cpu():
    # cold, inductor needs about a minute on 2 cores (C++ kernels); its cache makes later runs seconds
    torch.manual_seed(0)
    model = tiny_mae(depth=1)
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    try:
        compiled = torch.compile(model)
        loss, pred, mask = compiled(imgs, 0.75, noise=noise)
        loss.backward()
        compiled_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad(set_to_none=True)
        eager_loss, eager_pred, _ = model(imgs, 0.75, noise=noise)
        eager_loss.backward()
        assert torch.allclose(loss, eager_loss, atol=1e-5)
        assert torch.allclose(pred, eager_pred, atol=1e-5)
        for name, p in model.named_parameters():
            if p.grad is not None:
                assert torch.allclose(compiled_grads[name], p.grad, atol=1e-5), name
    finally:
        torch._dynamo.reset()
