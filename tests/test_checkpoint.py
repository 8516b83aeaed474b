"""Loading weights: released-file shapes, resampling, heads, bad keys, and refusing pickled code."""
import argparse
import math
import os
import pickle
import stat

import pytest
import timm
import torch
import torch.nn.functional as F

import models_mae  # noqa: F401  (registers the models)
import models_vit  # noqa: F401
from util.checkpoint import load_checkpoint_file, load_pretrained, save_atomic
from util.errors import UserError

SMALL = dict(embed_dim=32, depth=2, num_heads=2)
SMALL_DEC = dict(decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def mae(img_size=32, **kwargs):
    return timm.create_model("mae_vit_tiny_patch4", img_size=img_size, **SMALL, **SMALL_DEC, **kwargs)


def vit(img_size=32, **kwargs):
    return timm.create_model("vit_tiny_patch4", img_size=img_size, **SMALL, **kwargs)


def save_original_style(path, state, **extra):
    """As the original research code saved: a dict with an argparse.Namespace among plain values."""
    torch.save({"model": state, "args": argparse.Namespace(model="mae", lr=1e-3), "epoch": 3, **extra}, path)


def test_full_pretraining_file_with_namespace_args_loads_into_the_mae_model(tmp_path):
    source = mae(norm_pix_loss=True)
    save_original_style(tmp_path / "full.pth", source.state_dict())
    target = mae()
    report = load_pretrained(target, tmp_path / "full.pth", log=None)
    assert report == dict(missing=[], unexpected=[], resampled=[], dropped=[])
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key


def test_encoder_only_file_into_the_mae_model_says_it_has_no_decoder(tmp_path):
    state = {k: v for k, v in mae().state_dict().items() if not k.startswith(("decoder", "mask_token"))}
    torch.save({"model": state}, tmp_path / "enc.pth")
    with pytest.raises(UserError, match="no decoder.*") as err:
        load_pretrained(mae(), tmp_path / "enc.pth", log=None)
    assert "mask_token" in str(err.value) and "enc.pth" in str(err.value)


@pytest.mark.parametrize("global_pool", [True, False])
def test_pretraining_file_into_a_classifier_misses_only_head_and_fc_norm(tmp_path, global_pool):
    torch.save({"model": mae().state_dict()}, tmp_path / "pre.pth")
    model = vit(num_classes=7, global_pool=global_pool)
    report = load_pretrained(model, tmp_path / "pre.pth", head_init_std=2e-5, log=None)
    expected_missing = {"head.weight", "head.bias"} | ({"fc_norm.weight", "fc_norm.bias"} if global_pool else set())
    assert set(report["missing"]) == expected_missing
    assert all(k.startswith(("decoder", "mask_token", "norm.")) for k in report["unexpected"])
    assert model.head.weight.std().item() < 1e-4 and torch.count_nonzero(model.head.bias) == 0


def test_bare_state_dict_with_ddp_prefix_loads(tmp_path):
    source = vit(num_classes=3)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "bare.pth")
    target = vit(num_classes=3)
    load_pretrained(target, tmp_path / "bare.pth", log=None)
    assert torch.equal(target.head.weight, source.head.weight)


def test_head_of_another_class_count_is_dropped_and_reinitialised(tmp_path):
    torch.save({"model": vit(num_classes=1000).state_dict()}, tmp_path / "ft.pth")
    model = vit(num_classes=10)
    report = load_pretrained(model, tmp_path / "ft.pth", head_init_std=0.01, log=None)
    assert report["dropped"] == ["head.weight", "head.bias"]
    assert 0.005 < model.head.weight.std().item() < 0.015


def test_missing_encoder_key_is_an_error_naming_it(tmp_path):
    state = mae().state_dict()
    del state["blocks.1.attn.qkv.weight"]
    torch.save({"model": state}, tmp_path / "broken.pth")
    with pytest.raises(UserError, match=r"missing keys \[blocks\.1\.attn\.qkv\.weight\]"):
        load_pretrained(vit(num_classes=2), tmp_path / "broken.pth", log=None)


def test_unexpected_key_is_an_error_naming_it(tmp_path):
    state = mae().state_dict()
    state["blocks.9.surprise"] = torch.zeros(1)
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(UserError, match=r"unexpected keys \[blocks\.9\.surprise\]"):
        load_pretrained(mae(), tmp_path / "odd.pth", log=None)


def test_shape_mismatch_is_an_error_naming_the_key(tmp_path):
    torch.save({"model": mae(in_chans=1).state_dict()}, tmp_path / "gray.pth")
    with pytest.raises(UserError, match=r"patch_embed\.proj\.weight: checkpoint \(32, 1, 4, 4\)"):
        load_pretrained(mae(in_chans=3), tmp_path / "gray.pth", log=None)


def resample_like_the_original(table, new_grid):
    """The original code's interpolate_pos_embed, written out: the cls row kept, the s x s grid reshaped to
    (1, D, s, s), F.interpolate bicubic with align_corners=False and no antialias, back to rows in raster order."""
    side = math.isqrt(table.shape[1] - 1)
    assert side * side == table.shape[1] - 1
    grid = table[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    new = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=False)
    new = new.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], -1)
    return torch.cat([table[:, :1], new], dim=1)


@pytest.fixture
def p14_file(tmp_path):
    """A pretraining file for 14 x 14 patches of 4 px whose position tables are random (the fixed sin-cos tables are
    smooth and symmetric, so a transposed or differently interpolated grid could come out close to them)."""
    torch.manual_seed(0)
    source = mae(img_size=56)
    with torch.no_grad():
        source.pos_embed.normal_()
        source.decoder_pos_embed.normal_()
    torch.save({"model": source.state_dict()}, tmp_path / "p14.pth")
    return tmp_path / "p14.pth", source.state_dict()


def test_position_tables_14x14_resample_to_16x16(p14_file):
    path, source = p14_file
    target = mae(img_size=64)  # 16 x 16
    report = load_pretrained(target, path, log=None)
    assert sorted(report["resampled"]) == ["decoder_pos_embed", "pos_embed"]
    for key in ("pos_embed", "decoder_pos_embed"):
        table = target.state_dict()[key]
        assert table.shape == (1, 1 + 16 * 16, source[key].shape[-1])
        assert torch.equal(table[:, 0], source[key][:, 0])  # the cls row is kept as is
        torch.testing.assert_close(table, resample_like_the_original(source[key], (16, 16)), atol=1e-6, rtol=1e-6)
    # and the classifier path does the same for a fine-tuning run at a larger size
    model = vit(img_size=64, num_classes=2)
    load_pretrained(model, path, log=None)
    torch.testing.assert_close(model.pos_embed.detach(), resample_like_the_original(source["pos_embed"], (16, 16)),
                               atol=1e-6, rtol=1e-6)


def test_position_table_14x14_resamples_to_a_non_square_12x16_grid(p14_file):
    """A 48 x 64 px input (as 192 x 256 px would be for 16-px patches): fewer rows, more columns than the
    checkpoint's grid; rows follow the image's height."""
    path, source = p14_file
    model = vit(img_size=(48, 64), num_classes=2)
    assert tuple(model.patch_embed.grid_size) == (12, 16)
    report = load_pretrained(model, path, log=None)
    assert report["resampled"] == ["pos_embed"]
    table = model.pos_embed.detach()
    assert table.shape == (1, 1 + 12 * 16, 32)
    assert torch.equal(table[:, 0], source["pos_embed"][:, 0])
    torch.testing.assert_close(table, resample_like_the_original(source["pos_embed"], (12, 16)), atol=1e-6, rtol=1e-6)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_with_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Exploit(marker)}, tmp_path / "evil.pth")
    with pytest.raises(UserError, match="refused for safety"):
        load_checkpoint_file(tmp_path / "evil.pth")
    assert not marker.exists()
    # the same payload through plain pickle would have run: the test's payload is real
    pickle.loads(pickle.dumps(_Exploit(marker)))
    assert marker.exists()


def test_missing_and_corrupt_files_name_the_file(tmp_path):
    with pytest.raises(UserError, match="nope.pth does not exist"):
        load_checkpoint_file(tmp_path / "nope.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        load_checkpoint_file(tmp_path / "junk.pth")


def test_save_atomic_keeps_the_old_file_when_writing_fails(tmp_path):
    path = tmp_path / "checkpoint-last.pth"
    save_atomic({"epoch": 1}, path)

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_atomic({"epoch": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint-last.pth"]  # no temporary left behind


def test_save_atomic_gives_the_mode_a_plain_open_would(tmp_path):
    old = os.umask(0o022)
    try:
        save_atomic({"epoch": 1}, tmp_path / "ckpt.pth")
        (tmp_path / "plain.txt").write_text("x")
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "ckpt.pth").stat().st_mode)
    assert mode == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644


def test_namespace_args_load_on_torch_2_4_without_the_safe_globals_context(tmp_path, monkeypatch):
    """torch 2.4 has only the process-wide ``add_safe_globals``; the loader must use it there."""
    before = list(torch.serialization.get_safe_globals())
    monkeypatch.delattr(torch.serialization, "safe_globals")
    save_original_style(tmp_path / "orig.pth", mae().state_dict())
    try:
        assert load_checkpoint_file(tmp_path / "orig.pth")["args"].lr == 1e-3
        assert argparse.Namespace in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()
        torch.serialization.add_safe_globals(before)


def test_garbage_and_truncated_files_are_called_damaged_not_unsafe(tmp_path):
    torch.save({"model": {"w": torch.zeros(4096)}}, tmp_path / "good.pth")
    data = (tmp_path / "good.pth").read_bytes()
    (tmp_path / "truncated.pth").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pth").write_bytes(bytes(range(256)) * 16)
    for name in ("truncated.pth", "random.pth"):
        with pytest.raises(UserError, match=f"{name}: not a PyTorch checkpoint") as error:
            load_checkpoint_file(tmp_path / name)
        assert "safety" not in str(error.value)
    assert torch.equal(load_checkpoint_file(tmp_path / "good.pth")["model"]["w"], torch.zeros(4096))
