"""Weights from Hugging Face (ViTMAE) and timm in, safetensors / Hub formats out: same outputs both ways, one clear
error for each thing that cannot work. transformers is a test dependency only."""
import json
import os

import pytest
import safetensors.torch
import timm
import torch

import export
import main_finetune
import models_mae  # noqa: F401  (registers mae_vit_*)
import models_vit  # noqa: F401  (registers vit_*)
from conftest import log_lines, run_in_process, run_program, SUBPROCESS_TIMEOUT, watch_training
from util.checkpoint import load_checkpoint_file, load_pretrained
from util.errors import UserError

transformers = pytest.importorskip("transformers")

# ViTMAEConfig of mae_vit_micro_patch4 (28 px, 1 channel; HF's LayerNorm eps set to ours, 1e-6, so outputs agree)
MICRO = dict(hidden_size=96, num_hidden_layers=4, num_attention_heads=3, intermediate_size=384, image_size=28,
             patch_size=4, num_channels=1, decoder_hidden_size=64, decoder_num_hidden_layers=1,
             decoder_num_attention_heads=2, decoder_intermediate_size=256, layer_norm_eps=1e-6, norm_pix_loss=True)
TIMM_MICRO = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=96, depth=4, num_heads=3)  # timm's vit_micro_patch4
NUM_PATCHES = 49
TOL = dict(atol=1e-5, rtol=0)


def perturbed(model, seed=0):
    """Every tensor moved off its init (position tables included), so a wrong mapping shows in the outputs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def hf_model(cls="ViTMAEForPreTraining", **overrides):
    torch.manual_seed(0)
    return perturbed(getattr(transformers, cls)(transformers.ViTMAEConfig(**{**MICRO, **overrides})))


def save_hf(model, path, torch_file=False):
    """``save_pretrained``; with ``torch_file`` the weights as pytorch_model.bin instead (older repositories)."""
    model.save_pretrained(path)
    if torch_file:
        torch.save(safetensors.torch.load_file(path / "model.safetensors"), path / "pytorch_model.bin")
        (path / "model.safetensors").unlink()
    return path


def inputs(n=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=gen), torch.rand(n, NUM_PATCHES, generator=gen)


ASCENDING = torch.arange(float(NUM_PATCHES)).expand(2, -1)  # with mask ratio 0, every patch in its order


def assert_same_pretraining_outputs(hf, ours):
    x, noise = inputs()
    with torch.no_grad():
        expected = hf(pixel_values=x, noise=noise)
        loss, pred, mask = ours(x, mask_ratio=hf.config.mask_ratio, noise=noise)
    torch.testing.assert_close(loss, expected.loss, **TOL)
    torch.testing.assert_close(pred, expected.logits, **TOL)
    assert torch.equal(mask, expected.mask) and mask.sum() == 2 * (NUM_PATCHES - NUM_PATCHES // 4)


def our_mae(**kwargs):
    return timm.create_model("mae_vit_micro_patch4", norm_pix_loss=True, **kwargs).eval()


def our_encoder(**kwargs):
    return timm.create_model("vit_micro_patch4", num_classes=0, global_pool=False, **kwargs).eval()


@pytest.fixture(scope="module")
def our_checkpoint(tmp_path_factory):
    """A pretraining checkpoint as main_pretrain.py writes it (random weights)."""
    path = tmp_path_factory.mktemp("ours") / "checkpoint-last.pth"
    torch.manual_seed(0)
    args = dict(model="mae_vit_micro_patch4", input_size=28, norm_pix_loss=True, mask_ratio=0.75, dataset="fashion_mnist")
    torch.save({"model": perturbed(our_mae()).state_dict(), "epoch": 0, "args": args}, path)
    return path


@pytest.mark.parametrize("torch_file", [False, True], ids=["safetensors", "pytorch_model.bin"])
def test_hf_pretraining_directory_loads_with_the_same_outputs(tmp_path, torch_file):
    hf = hf_model()
    path = save_hf(hf, tmp_path / "hf", torch_file)
    ours = our_mae()
    report = load_pretrained(ours, path)
    assert not any(report.values())  # every key of ours came from the file
    assert_same_pretraining_outputs(hf, ours)
    assert load_checkpoint_file(path)["args"] == {"input_size": 28, "norm_pix_loss": True, "mask_ratio": 0.75}


def test_hf_encoder_directory_loads_into_a_classifier_with_the_same_features(tmp_path):
    hf = hf_model("ViTMAEModel", mask_ratio=0.0)  # keeps every patch: with ascending noise, in their order
    path = save_hf(hf, tmp_path / "enc")
    ours = our_encoder()
    load_pretrained(ours, path)
    x, _ = inputs()
    with torch.no_grad():
        expected = hf(pixel_values=x, noise=ASCENDING).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), expected, **TOL)
    with pytest.raises(UserError, match="no decoder"):  # a masked autoencoder needs the decoder too
        load_pretrained(our_mae(), path)


def test_hf_config_that_does_not_fit_the_model_is_one_error_naming_the_differences(tmp_path):
    path = save_hf(hf_model(hidden_size=48, num_hidden_layers=2, decoder_num_hidden_layers=2), tmp_path / "hf")
    with pytest.raises(UserError) as error:
        load_pretrained(our_mae(), path)
    message = str(error.value)
    assert "width 48 vs 96" in message and "depth 2 vs 4" in message and "decoder depth 2 vs 1" in message
    assert "\n" not in message
    path = save_hf(hf_model("ViTMAEModel", patch_size=7), tmp_path / "enc")
    with pytest.raises(UserError, match="patch size 7 vs 4"):
        load_pretrained(our_encoder(), path)


def test_hf_layer_norm_eps_other_than_ours_loads_with_a_note(tmp_path):
    path = save_hf(hf_model(layer_norm_eps=1e-12), tmp_path / "hf")  # transformers' default, facebook/vit-mae-*'s
    notes = []
    load_pretrained(our_mae(), path, log=notes.append)
    assert any("eps 1e-12" in note for note in notes)


def test_export_hf_gives_transformers_the_same_outputs_and_round_trips(our_checkpoint, tmp_path):
    out = tmp_path / "hf"
    run_in_process(export, ["--checkpoint", our_checkpoint, "--format", "hf", "--output_dir", out])
    hf, info = transformers.ViTMAEForPreTraining.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours = our_mae()
    load_pretrained(ours, our_checkpoint)
    assert_same_pretraining_outputs(hf.eval(), ours)
    back = our_mae()
    load_pretrained(back, out)  # and back: every tensor as it was
    original = torch.load(our_checkpoint, weights_only=True)["model"]
    assert back.state_dict().keys() == original.keys()
    assert all(torch.equal(back.state_dict()[k], v) for k, v in original.items())


def test_export_hf_of_an_encoder_only_checkpoint_is_a_vitmae_model(our_checkpoint, tmp_path):
    state = torch.load(our_checkpoint, weights_only=True)["model"]
    encoder = {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}
    torch.save({"model": encoder}, tmp_path / "encoder.pth")  # like the released mae_pretrain_vit_*.pth
    out = tmp_path / "hf"
    run_in_process(export, ["--checkpoint", tmp_path / "encoder.pth", "--model", "mae_vit_micro_patch4",
                            "--input_size", "28", "--output_dir", out])
    assert json.loads((out / "config.json").read_text())["architectures"] == ["ViTMAEModel"]
    hf, info = transformers.ViTMAEModel.from_pretrained(out, output_loading_info=True, mask_ratio=0.0)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = our_encoder()
    load_pretrained(ours, tmp_path / "encoder.pth")
    x, _ = inputs()
    with torch.no_grad():
        expected = hf.eval()(pixel_values=x, noise=ASCENDING).last_hidden_state
        torch.testing.assert_close(ours.forward_features(x), expected, **TOL)


def test_export_timm_gives_timm_the_same_outputs_and_round_trips(our_checkpoint, tmp_path):
    out = tmp_path / "timm"
    run_in_process(export, ["--checkpoint", our_checkpoint, "--format", "timm", "--output_dir", out])
    config = json.loads((out / "config.json").read_text())
    assert config["pretrained_cfg"]["input_size"] == [1, 28, 28] and config["num_classes"] == 0
    ours = our_encoder()
    load_pretrained(ours, our_checkpoint)
    from_dir = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    from_file = timm.create_model(config["architecture"], pretrained=True, **config["model_args"],
                                  pretrained_cfg_overlay=dict(file=str(out / "model.safetensors"))).eval()
    x, _ = inputs()
    with torch.no_grad():
        expected = ours.forward_features(x)
        for model in (from_dir, from_file):
            assert type(model).__module__.startswith("timm.")  # timm's own ViT, not ours
            torch.testing.assert_close(model.forward_features(x), expected, **TOL)
    back = our_encoder()
    load_pretrained(back, out)  # the timm directory reads back here
    assert all(torch.equal(back.state_dict()[k], v) for k, v in ours.state_dict().items())


def test_export_timm_of_a_fine_tuned_classifier_keeps_its_head(tmp_path):
    torch.manual_seed(0)
    classifier = perturbed(timm.create_model("vit_micro_patch4", num_classes=5))  # global pool + fc_norm
    torch.save({"model": classifier.state_dict(), "args": {"model": "vit_micro_patch4", "input_size": 28}},
               tmp_path / "ft.pth")
    run_in_process(export, ["--checkpoint", tmp_path / "ft.pth", "--format", "timm", "--output_dir", tmp_path / "out"])
    exported = timm.create_model(f"local-dir:{tmp_path / 'out'}", pretrained=True).eval()
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(exported(x), classifier(x), **TOL)


@pytest.mark.parametrize("as_file", [False, True], ids=["directory", "file"])
def test_timm_weights_load_with_the_same_features(tmp_path, as_file):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TIMM_MICRO, num_classes=0).eval()
    timm.models.save_for_hf(vit, tmp_path / "timm", safe_serialization=True)
    ours = our_encoder()
    load_pretrained(ours, tmp_path / "timm" / "model.safetensors" if as_file else tmp_path / "timm")
    x, _ = inputs()
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), vit.forward_features(x), **TOL)


def test_a_timm_directory_names_its_model(tmp_path):
    vit = timm.create_model("vit_tiny_patch16_224", **TIMM_MICRO, num_classes=0, pretrained_cfg_overlay=dict(tag="mae"))
    timm.models.save_for_hf(vit, tmp_path, safe_serialization=True)
    assert load_checkpoint_file(tmp_path)["args"]["model"] == "vit_tiny_patch16_224.mae"  # e.g. a teacher's


@pytest.fixture(scope="module")
def fashion_mnist(tmp_path_factory):
    from fakedata import make_fashion_mnist

    return make_fashion_mnist(tmp_path_factory.mktemp("data"), n_train=16, n_test=8)


def micro_finetune_argv(data_path, out, *extra):
    return ["--model", "vit_micro_patch4", "--dataset", "fashion_mnist", "--input_size", "28", "--data_path", data_path,
            "--epochs", "1", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0", "--output_dir", out,
            "--log_dir", out, *extra]


def test_finetuning_program_from_a_saved_hf_directory(fashion_mnist, tmp_path):
    hf_dir = save_hf(hf_model(), tmp_path / "hf")
    out = tmp_path / "ft"
    result = run_program("main_finetune.py", *micro_finetune_argv(fashion_mnist, out, "--finetune", hf_dir),
                         timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 0, result.stderr[-2000:]
    loaded = [line for line in result.stdout.splitlines() if line.startswith(f"loaded {hf_dir}: missing [")]
    assert len(loaded) == 1 and "head.weight" in loaded[0] and "blocks.3" not in loaded[0]
    assert [line["epoch"] for line in log_lines(out)] == [0]


def test_finetuning_from_a_timm_file_starts_from_its_weights(fashion_mnist, tmp_path, monkeypatch):
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", **TIMM_MICRO, num_classes=0)
    safetensors.torch.save_file(vit.state_dict(), tmp_path / "vit.safetensors")
    seen = watch_training(monkeypatch, main_finetune)
    run_in_process(main_finetune, micro_finetune_argv(fashion_mnist, tmp_path / "ft", "--finetune",
                                                      tmp_path / "vit.safetensors"))
    source = vit.state_dict()
    encoder = [k for k in seen["initial"] if not k.startswith(("head.", "fc_norm."))]
    assert len(encoder) == 4 * 12 + 4 and all(torch.equal(seen["initial"][k], source[k]) for k in encoder)


def test_hub_name_offline_and_not_cached_is_one_line_saying_what_to_pass(fashion_mnist, tmp_path):
    result = run_program("main_finetune.py", *micro_finetune_argv(fashion_mnist, tmp_path, "--finetune",
                                                                  "hf-hub:facebook/vit-mae-base"),
                         env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}, timeout=SUBPROCESS_TIMEOUT)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download hf-hub:facebook/vit-mae-base")
    assert "offline" in lines[0] and "--local-dir DIR" in lines[0] and "pass DIR" in lines[0]


def test_hub_name_offline_is_read_from_the_cache(tmp_path, monkeypatch):
    """A repository in huggingface_hub's cache layout (as a download leaves it) loads offline by its hub name."""
    import huggingface_hub

    snapshot = tmp_path / "models--someone--vit-mae-tiny" / "snapshots" / ("0" * 40)
    save_hf(hf_model(), snapshot)
    (tmp_path / "models--someone--vit-mae-tiny" / "refs").mkdir()
    (tmp_path / "models--someone--vit-mae-tiny" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    ours = our_mae()
    load_pretrained(ours, "hf-hub:someone/vit-mae-tiny")
    assert_same_pretraining_outputs(hf_model(), ours)


def test_push_to_hub_offline_is_one_error_keeping_the_export(our_checkpoint, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="cannot upload to me/mae.*the export is in") as error:
        run_in_process(export, ["--checkpoint", our_checkpoint, "--output_dir", tmp_path, "--push_to_hub", "me/mae"])
    assert "\n" not in str(error.value) and (tmp_path / "model.safetensors").is_file()


class RunsCode:
    def __reduce__(self):
        return os.system, ("touch pwned",)


def test_pytorch_model_bin_with_arbitrary_globals_is_refused(tmp_path, monkeypatch):
    path = save_hf(hf_model(), tmp_path / "hf", torch_file=True)
    torch.save({**torch.load(path / "pytorch_model.bin"), "payload": RunsCode()}, path / "pytorch_model.bin")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match="refused for safety"):
        load_pretrained(our_mae(), path)
    assert not (tmp_path / "pwned").exists()


def test_a_directory_of_another_model_or_without_weights_is_one_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 192}))
    with pytest.raises(UserError, match="needs config.json and model.safetensors or pytorch_model.bin"):
        load_checkpoint_file(tmp_path)
    safetensors.torch.save_file({"x": torch.zeros(1)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="a Hugging Face vit model; only ViTMAE"):
        load_checkpoint_file(tmp_path)


def test_visualize_and_a_teacher_read_a_hf_directory(tmp_path, capsys):
    import visualize
    from PIL import Image
    from util.targets import load_teacher

    path = save_hf(hf_model(), tmp_path / "hf")
    Image.new("L", (28, 28), 128).save(tmp_path / "grey.png")
    run_in_process(visualize, ["--checkpoint", path, "--model", "mae_vit_micro_patch4", "--dataset", "fashion_mnist",
                               "--images", tmp_path / "grey.png", "--output", tmp_path / "x.png", "--device", "cpu"])
    assert (tmp_path / "x.png").is_file()
    assert "28 px, 1 channel(s), target norm_pixel, norm_pix_loss True" in capsys.readouterr().out  # config.json's
    teacher = load_teacher("vit_micro_patch4", str(path), False, 28)[0]
    ours = our_encoder()
    load_pretrained(ours, path)
    assert all(torch.equal(teacher.state_dict()[k], v) for k, v in ours.state_dict().items())
