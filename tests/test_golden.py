"""Golden values: seeded CPU runs of the three programs and the models' state-dict layouts, recorded from the
code before a refactoring and asserted after it, so moving code cannot change what it computes.

The values were produced by these very tests' command lines (tiny ViT with 4-px patches on the generated
32-px images, one process, fp32). A deliberate change of behaviour updates them in the same commit, saying why.
They depend on every draw from the global random stream: the from-scratch class-token init (drawn before the new
head is initialised) and the loaders' own generators (which keep their per-epoch draw off that stream).
"""
import hashlib
import json

import pytest
import timm
import torch

import main_finetune
import main_linprobe
import main_pretrain
import models_mae  # noqa: F401  (registers the models)
import models_vit  # noqa: F401
from conftest import tiny_pretrain_argv

# float noise across thread counts stays far below this; any change of the computation goes far above it
REL = 1e-4


def run(module, argv):
    module.main(module.get_args_parser().parse_args(argv))


def logged(output_dir, *keys):
    lines = [json.loads(line) for line in (output_dir / "log.txt").read_text().splitlines()]
    return [tuple(line[k] for k in keys) for line in lines]


@pytest.fixture(scope="module")
def golden_runs(tmp_path_factory):
    from fakedata import make_imagefolder

    root = tmp_path_factory.mktemp("golden")
    data = make_imagefolder(root / "data", num_classes=2, per_class=8, size=32)
    pre = root / "pre"
    run(main_pretrain, tiny_pretrain_argv(data, pre, "--epochs", "2", "--warmup_epochs", "1", "--vis_freq", "0"))

    def classifier_argv(out, *extra):
        return ["--model", "vit_tiny_patch4", "--input_size", "32", "--data_path", str(data), "--nb_classes", "2",
                "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0", "--warmup_epochs", "1",
                "--output_dir", str(out), "--log_dir", str(out), "--print_freq", "5",
                "--finetune", str(pre / "checkpoint-last.pth"), *extra]

    run(main_finetune, classifier_argv(root / "ft", "--lr", "1e-3"))
    run(main_linprobe, classifier_argv(root / "lp", "--blr", "0.5"))
    return root


def test_pretraining_losses_are_the_recorded_ones(golden_runs):
    losses = [loss for (loss,) in logged(golden_runs / "pre", "train_loss")]
    assert losses == pytest.approx([4.199689865112305, 3.7072997093200684], rel=REL)


def test_finetuning_losses_are_the_recorded_ones(golden_runs):
    got = logged(golden_runs / "ft", "train_loss", "test_loss", "test_acc1")
    expected = [(0.6931262016296387, 0.6919573545455933, 100.0), (0.7020434141159058, 0.6888144910335541, 50.0)]
    assert [v for row in got for v in row] == pytest.approx([v for row in expected for v in row], rel=REL)


def test_linear_probe_losses_are_the_recorded_ones(golden_runs):
    got = logged(golden_runs / "lp", "train_loss", "test_loss", "test_acc1")
    expected = [(0.6962668895721436, 0.693458616733551, 50.0), (0.6846225261688232, 0.6930175721645355, 50.0)]
    assert [v for row in got for v in row] == pytest.approx([v for row in expected for v in row], rel=REL)


@pytest.mark.parametrize("name,count,digest", [
    ("mae_vit_base_patch16", 254, "5df3d11bada71ddd"),
    ("vit_base_patch16", 152, "e5352f24533ee5cd"),
    ("mae_vit_huge_patch14", 494, "af876e71512b55c3"),
])
def test_state_dict_names_and_shapes_are_the_recorded_ones(name, count, digest):
    with torch.device("meta"):
        state = timm.create_model(name).state_dict()
    layout = ";".join(f"{key}:{tuple(value.shape)}" for key, value in state.items())
    assert (len(state), hashlib.sha256(layout.encode()).hexdigest()[:16]) == (count, digest)


def test_reconstruction_of_a_seeded_model_is_the_recorded_one():
    torch.manual_seed(0)
    model = timm.create_model("mae_vit_tiny_patch4", img_size=32, depth=2, decoder_depth=1, norm_pix_loss=True).eval()
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    noise = torch.rand(2, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        loss, pred, mask = model(images, 0.75, noise=noise)
    assert mask.sum().item() == 96
    assert [loss.item(), pred.double().sum().item(), pred.double().abs().sum().item()] == pytest.approx(
        [2.843543767929077, 1500.8545656420174, 6539.969303411373], rel=REL)
