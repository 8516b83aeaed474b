"""The training-step benchmark, the "with [M]" baseline it measures (benchmarks/with_mask_tokens.py) and the
activation checkpointing option of the MAE model.

Everything runs on tiny models in seconds; the real numbers come from running benchmarks/bench_step.py.
"""
import argparse
import importlib.util
import json
import shutil
import statistics

import pytest
import torch

import models_mae
from benchmarks.flops import EXTRA_FLOP_FORMULAS
from benchmarks.with_mask_tokens import MaskedAutoencoderWithMaskTokens
from conftest import REPO, run_program
from util.amp import cpu_has_native_bf16

TINY = dict(img_size=16, patch_size=4, in_chans=3, embed_dim=32, depth=2, num_heads=2,
            decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_mae(**kwargs):
    return models_mae.MaskedAutoencoderViT(**{**TINY, **kwargs})


def tiny_with_mask_tokens(**kwargs):
    return MaskedAutoencoderWithMaskTokens(**{**TINY, **kwargs})


def load_bench_step():
    spec = importlib.util.spec_from_file_location("bench_step", REPO / "benchmarks" / "bench_step.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ the program
BATCH = 2


@pytest.fixture(scope="module")
def bench_json(tmp_path_factory):
    """One real command line on a tiny model: MAE, 'with [M]' and fine-tuning, two timed steps each."""
    out = tmp_path_factory.mktemp("bench") / "out.json"
    result = run_program("benchmarks/bench_step.py", "--model", "mae_vit_tiny_patch4", "--input_size", "16",
                         "--batch_size", str(BATCH), "--device", "cpu", "--attention", "plain", "--mode", "both", "--compare_mask_tokens",
                         "--steps", "2", "--warmup", "1", "--peak_sizes", "64,128", "--peak_reps", "2",
                         "--json", out, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(out.read_text()), result.stdout


def step_flops(tokens, decoder_tokens=None, batch=BATCH, patches=16, patch_pixels=48, dim=192, depth=12,
               decoder_dim=192, decoder_depth=4, classes=None):
    """FLOPs of one training step counted by hand: 2 per multiply-add; the backward pass costs twice the
    forward for a linear layer (gradients of input and weight), once for the patch projection (the images need
    no gradient), and twice for attention on the plain path (``--attention plain``: four products; a fused kernel's backward
    also recomputes the scores: 5/2)."""
    linear = depth * tokens * 12 * dim**2  # per block and token: qkv 3 D², projection D², MLP 8 D²
    attention = depth * 2 * tokens**2 * dim  # q kᵀ and attention × v, all heads together
    if classes:  # the fine-tuning head on the pooled token
        linear += classes * dim
    else:  # the decoder: embedding, blocks and prediction, always on every patch + cls
        linear += tokens * dim * decoder_dim + decoder_depth * decoder_tokens * 12 * decoder_dim**2
        linear += decoder_tokens * decoder_dim * patch_pixels
        attention += decoder_depth * 2 * decoder_tokens**2 * decoder_dim
    patch_embed = patches * patch_pixels * dim
    forward = lambda macs: 2 * batch * macs  # noqa: E731
    return int(forward(patch_embed) * 2 + forward(linear) * 3 + forward(attention) * 3)


def test_step_flops_match_a_hand_count_and_give_the_expected_speedup(bench_json):
    # mae_vit_tiny_patch4 at 16 px: 16 patches of 4x4x3 px, 192-d x 12 blocks, 192-d x 4-block decoder
    report, _ = bench_json
    runs = {r["kind"]: r for r in report["runs"]}
    kept = int(16 * (1 - 0.75))
    mae = step_flops(tokens=1 + kept, decoder_tokens=17)  # the encoder sees the kept patches only
    with_m = step_flops(tokens=17, decoder_tokens=17)  # every patch through the encoder
    assert runs["pretrain"]["flops_per_step"] == mae
    assert runs["pretrain_mask_tokens"]["flops_per_step"] == with_m
    assert runs["finetune"]["flops_per_step"] == step_flops(tokens=17, classes=1000)
    assert report["speedup_vs_mask_tokens"]["flops"] == pytest.approx(with_m / mae, rel=1e-12)
    assert 2.1 < with_m / mae < 2.2  # 1.48 / 0.69 GFLOP: the 4-block decoder runs at full length in both


def test_bench_step_json_fields_agree_with_each_other_and_the_table(bench_json):
    report, stdout = bench_json
    assert report["device_type"] == "cpu" and report["threads"] >= 1 and report["args"]["batch_size"] == BATCH
    assert [r["kind"] for r in report["runs"]] == ["pretrain", "pretrain_mask_tokens", "finetune"]
    assert [r["model"] for r in report["runs"]] == ["mae_vit_tiny_patch4"] * 2 + ["vit_tiny_patch4"]
    peak = report["peak"]
    assert set(peak["flops_per_s_by_size"]) == {"64", "128"}
    assert peak["flops_per_s_by_size"][str(peak["size"])] == max(peak["flops_per_s_by_size"].values())
    assert peak["probes"] == sum(len(r["step_times_s"]) for r in report["runs"])  # one probe after every timed step
    for run in report["runs"]:
        assert len(run["step_times_s"]) == 2 and run["loss_finite"], run["kind"]
        assert run["step_time_s"] == statistics.median(run["step_times_s"])
        assert run["images_per_s"] == pytest.approx(BATCH / run["step_time_s"])
        assert run["flops_per_s"] == pytest.approx(run["flops_per_step"] / run["step_time_s"])
        assert run["flops_per_image"] == pytest.approx(run["flops_per_step"] / BATCH)
        assert 0 < run["fraction_of_peak"] and 0 < run["cpu_share"] <= 1.5
        assert run["optimizer"] == "fused"  # util.runtime.adamw on a CPU
        floor = run["floor_s"]  # casts only under autocast (the default amp depends on the host)
        assert floor["update_s"] > 0 and (floor["cast_s"] > 0) == (report["args"]["amp"] != "none")
        assert run["best_step_s"] == pytest.approx(
            run["flops_per_step"] / run["peak_flops_per_s"] + floor["update_s"] + floor["cast_s"])
        assert 0 < run["best_fraction_of_peak"] < 1
    mae, with_m = report["runs"][:2]
    embed_dim, decoder_dim = 192, 192
    # with [M] trains the encoder's mask token and freezes the decoder's
    assert with_m["parameters"] == mae["parameters"] + embed_dim - decoder_dim
    speedup = report["speedup_vs_mask_tokens"]
    assert speedup["wall_clock"] == pytest.approx(with_m["step_time_s"] / mae["step_time_s"])
    assert speedup["peak_normalised"] == pytest.approx(
        with_m["step_time_s"] * with_m["peak_flops_per_s"] / (mae["step_time_s"] * mae["peak_flops_per_s"]))
    assert f"{speedup['flops']:.2f}x fewer FLOPs" in stdout and f"{speedup['wall_clock']:.2f}x wall clock" in stdout
    assert "MAE pretrain" in stdout and "pretrain with [M]" in stdout and "matmul peak" in stdout
    assert f"at most {mae['best_fraction_of_peak']:.1%} of peak" in stdout
    # the warning about emulated bf16 follows the host's detection, in the JSON and the table alike
    assert report["no_native_bf16"] == (report["args"]["amp"] == "bf16" and not cpu_has_native_bf16())
    assert ("this CPU has no native bf16" in stdout) == report["no_native_bf16"]


def test_auto_optimizer_is_the_training_programs_adamw():
    bench = load_bench_step()
    model = tiny_with_mask_tokens()
    optimizer, impl = bench.make_optimizer(model, argparse.Namespace(optimizer="auto"), torch.device("cpu"))
    assert impl == "fused" and optimizer.defaults["fused"] and optimizer.defaults["betas"] == (0.9, 0.95)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.encoder_mask_token) not in decayed and id(model.blocks[0].attn.qkv.weight) in decayed
    assert id(model.mask_token) not in {id(p) for g in optimizer.param_groups for p in g["params"]}  # frozen
    _, impl = bench.make_optimizer(model, argparse.Namespace(optimizer="forloop"), torch.device("cpu"))
    assert impl == "forloop"


def test_flop_count_includes_attention_on_cpu():
    # FlopCounterMode alone misses the CPU flash-attention kernel; the benchmark adds its formula
    q = torch.randn(2, 2, 8, 4, requires_grad=True)

    def attention():
        torch.nn.functional.scaled_dot_product_attention(q, q, q).sum().backward()

    with torch.utils.flop_counter.FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        attention()
    bmm = 2 * (2 * 2) * 8 * 8 * 4  # one (batch x heads) of 8x4 @ 4x8 products
    # forward: q @ k^T and attn @ v; backward: the scores recomputed, then four products for the gradients
    assert counter.get_total_flops() == 2 * bmm + 5 * bmm


# ------------------------------------------------------------------------------------------ with [M]
def test_with_mask_tokens_model_runs_with_finite_loss_and_one_extra_parameter():
    torch.manual_seed(0)
    model = tiny_with_mask_tokens()
    default_keys = set(tiny_mae().state_dict())
    assert set(model.state_dict()) - default_keys == {"encoder_mask_token"}
    assert default_keys == set(model.state_dict()) - {"encoder_mask_token"}
    assert model.encoder_mask_token.std() > 0.005  # initialised like the mask token, not left at zero
    imgs = torch.randn(2, 3, 16, 16)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, 0.75, noise=noise)
    assert torch.isfinite(loss) and pred.shape == (2, 16, 48)
    assert torch.equal(mask, tiny_mae()(imgs, 0.75, noise=noise)[2])  # the same noise removes the same patches
    assert mask.sum() == 2 * 12
    latent, _, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    assert latent.shape == (2, 1 + 16, 32)  # the encoder saw every patch
    loss.backward()
    assert model.encoder_mask_token.grad is not None and model.encoder_mask_token.grad.abs().sum() > 0
    assert not model.mask_token.requires_grad and model.mask_token.grad is None  # unused by the decoder
    assert "encoder_mask_token" in model.no_weight_decay()


def test_encoder_mask_token_replaces_exactly_the_removed_patches():
    torch.manual_seed(0)
    model = tiny_with_mask_tokens(depth=0)  # no blocks: the latent is the norm of the input tokens
    model.norm = torch.nn.Identity()
    imgs = torch.randn(1, 3, 16, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.5, noise=torch.rand(1, 16))
    patches = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    token = model.encoder_mask_token + model.pos_embed[:, 1:]
    removed = mask[0].bool()
    assert removed.sum() == 8
    assert torch.allclose(latent[0, 1:][removed], token[0][removed])
    assert torch.allclose(latent[0, 1:][~removed], patches[0][~removed])
    assert torch.allclose(latent[0, 0], (model.cls_token + model.pos_embed[:, :1])[0, 0])


def test_with_mask_tokens_decoder_keeps_the_patch_order():
    # identity decoder: the prediction is the embedded latent, so patch i must come back as the latent's token i
    model = tiny_with_mask_tokens(decoder_embed_dim=32, decoder_depth=0)
    model.decoder_embed = model.decoder_norm = model.decoder_pred = torch.nn.Identity()
    model.decoder_pos_embed.data.zero_()
    latent = torch.randn(2, 17, 32)
    ids_restore = torch.argsort(torch.rand(2, 16), dim=1)
    assert torch.equal(model.forward_decoder(latent, ids_restore), latent[:, 1:])


def test_like_builds_the_baseline_of_a_registered_model_with_its_weights():
    torch.manual_seed(0)
    mae = models_mae.mae_vit_tiny_patch4(img_size=16, norm_pix_loss=True, grad_ckpt=True)
    twin = MaskedAutoencoderWithMaskTokens.like(mae)
    assert twin.norm_pix_loss and twin.grad_ckpt and twin.patch_embed.img_size == (16, 16)
    assert len(twin.blocks) == 12 and len(twin.decoder_blocks) == 4 and twin.blocks[0].attn.num_heads == 3
    state = twin.state_dict()
    for key, value in mae.state_dict().items():
        assert torch.equal(state[key], value), key
    assert twin.blocks[0].norm1.eps == mae.blocks[0].norm1.eps


def test_default_model_layout_is_unchanged_by_grad_ckpt():
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


def test_bench_attention_plain_path_computes_what_the_fused_kernel_does():
    spec = importlib.util.spec_from_file_location("bench_attention", REPO / "benchmarks" / "bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    q, k, v = (torch.randn(2, 3, 13, 8) for _ in range(3))
    torch.testing.assert_close(module.plain(q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))
    assert module.time_ms(module.plain, (2, 3, 13, 8), bf16=True, reps=2) > 0
