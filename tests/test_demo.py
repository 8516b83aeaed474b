"""The end-to-end demo (README's main job) at toy size: every stage runs, the table and the figures come out."""
import json

import pytest
import torch

import demo
import util.datasets
from benchmarks import demo_variants
from conftest import log_lines, run_program
from fakedata import make_fashion_mnist
from util.amp import resolve_amp
from util.errors import UserError
from util.runtime import compile_unavailable


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = make_fashion_mnist(root / "data", n_train=64, n_test=32)
    out = root / "out"
    result = run_program("demo.py", "--data_path", data, "--output_dir", out, "--device", "cpu",
                         "--num_workers", "0", "--batch_size", "16", "--finetune_batch_size", "16",
                         "--pretrain_epochs", "2", "--no-compile",
                         "--probe_epochs", "1", "--finetune_epochs", "1", "--downstream_images", "48",
                         "--knn_train_images", "40", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_demo_prints_and_writes_the_four_accuracies(demo_run):
    out, stdout = demo_run
    results = json.loads((out / "results.json").read_text())
    stages = {"linprobe_pretrained", "linprobe_random", "finetune_pretrained", "finetune_random", "linprobe_pixels"}
    assert set(results["accuracy"]) == stages
    for stage in stages:
        # the table reports what each stage's own log measured on the 32 test images (multiples of 1/32)
        logged = [json.loads(line) for line in (out / stage / "log.txt").read_text().splitlines()]
        assert results["accuracy"][stage] == logged[-1]["test_acc1"]
        assert (results["accuracy"][stage] * 32 / 100) == pytest.approx(round(results["accuracy"][stage] * 32 / 100))
    table = (out / "results.md").read_text()
    assert "| MAE-pretrained encoder |" in table and "| random-init encoder |" in table
    assert f"| raw pixels (no encoder) | {results['accuracy']['linprobe_pixels']:.2f} % | — |" in table
    assert f"{results['accuracy']['finetune_random']:.2f} %" in stdout
    assert set(results["seconds"]) == stages | {"pretrain"}


def test_demo_stages_use_the_same_budget_and_only_the_pretrained_ones_load_weights(demo_run):
    out, stdout = demo_run
    assert stdout.count(f"loaded {out / 'pretrain' / 'checkpoint-last.pth'}") == 2  # probe and fine-tune
    for protocol in ("linprobe", "finetune"):
        logs = {init: [json.loads(line) for line in (out / f"{protocol}_{init}" / "log.txt").read_text().splitlines()]
                for init in ("pretrained", "random")}
        assert [e["epoch"] for e in logs["pretrained"]] == [e["epoch"] for e in logs["random"]] == [0]
    args = json.loads((out / "results.json").read_text())["args"]
    assert args["downstream_images"] == 48
    # the pixel baseline fits the probe's head to the same 48 images' 28 x 28 pixels, scored on the same 32
    assert stdout.count("cached the features of 48 training and 32 validation images") == 3
    assert "cached the features of 48 training and 32 validation images (784 per image)" in stdout
    host_precision = resolve_amp(None, torch.device("cpu"))
    assert stdout.count(f"--amp {host_precision} ") == 6  # every stage in the host's precision, written out
    assert "--compile" not in stdout  # --no-compile
    assert f"precision {host_precision}\n" in (out / "results.md").read_text()


@pytest.mark.parametrize("flags, compiled", [([], compile_unavailable() is None), (["--compile"], True),
                                             (["--no-compile"], False)])
def test_demo_compiles_only_the_pretraining_and_where_torch_compile_can_run(flags, compiled):
    args = demo.get_args_parser().parse_args([*flags, "--amp", "none"])
    stages = demo.stage_commands(args)
    assert ("--compile" in stages["pretrain"][1]) == compiled
    assert not any("--compile" in argv for name, (_, argv) in stages.items() if name != "pretrain")
    assert all(argv[argv.index("--amp") + 1] == "none" for _, argv in stages.values())


def test_demo_prints_the_knn_accuracy_after_every_pretraining_epoch(demo_run):
    out, stdout = demo_run
    logged = [json.loads(line)["knn_acc1"] for line in (out / "pretrain" / "log.txt").read_text().splitlines()]
    assert len(logged) == 2 and json.loads((out / "results.json").read_text())["knn_acc1"] == logged
    assert stdout.count("* kNN Acc@1") == 2 and "40 memory-bank and 32 query images" in stdout
    assert f"after each pretraining epoch: {logged[0]:.2f}, {logged[1]:.2f} %" in stdout


def test_demo_leaves_reconstruction_figures_and_loss_curve(demo_run):
    out, stdout = demo_run
    assert sorted(p.name for p in (out / "pretrain" / "vis").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png"]
    assert (out / "pretrain" / "loss_curve.png").stat().st_size > 0
    assert len((out / "pretrain" / "log.txt").read_text().splitlines()) == 2
    assert "loss curve" in stdout


def test_demo_downloads_fashion_mnist_only_when_missing_and_says_what_to_install_offline(tmp_path, monkeypatch):
    downloads = []

    def offline(root, train, download):
        downloads.append(root)
        raise OSError("no network")

    monkeypatch.setattr(demo, "FashionMNIST", offline)
    monkeypatch.setattr(util.datasets, "DEBIAN_FASHION_MNIST_DIR", str(tmp_path / "not_installed"))
    demo.find_fashion_mnist(make_fashion_mnist(tmp_path / "data"))  # present: no download
    assert downloads == []
    with pytest.raises(UserError, match="downloading it failed \\(no network\\): apt-get install dataset-fashion-mnist"):
        demo.find_fashion_mnist(str(tmp_path / "empty"))
    assert downloads == [str(tmp_path / "empty")]


def test_demo_variants_reruns_the_chosen_stages_with_changed_flags_on_the_demo_encoder(demo_run, tmp_path):
    out, _ = demo_run
    data = json.loads((out / "results.json").read_text())["args"]["data_path"]
    demo_files = sorted(p.name for p in (out / "pretrain").iterdir())
    variant = tmp_path / "variant"
    result = run_program("benchmarks/demo_variants.py", "--output_dir", variant, "--pretraining_from", out,
                         "--stages", "finetune_pretrained", "linprobe_random", "--stage_args=--epochs 2",
                         "--", "--data_path", data, "--device", "cpu", "--num_workers", "0", "--batch_size", "16",
                         "--finetune_batch_size", "16", "--probe_epochs", "1", "--finetune_epochs", "1",
                         "--downstream_images", "48", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((variant / "variant.json").read_text())
    assert list(report["accuracy"]) == ["linprobe_random", "finetune_pretrained"]  # in the demo's order
    for stage, accuracy in report["accuracy"].items():
        logged = log_lines(variant / stage)
        assert [e["epoch"] for e in logged] == [0, 1]  # --stage_args overrode the demo's one epoch
        assert accuracy == logged[-1]["test_acc1"]
    assert result.stdout.count(f"loaded {variant / 'pretrain' / 'checkpoint-last.pth'}") == 1
    assert (variant / "pretrain").resolve() == (out / "pretrain").resolve()
    assert sorted(p.name for p in (out / "pretrain").iterdir()) == demo_files  # the demo's run is only read
    assert "--stage_args=--epochs 2" in result.stdout.splitlines()[-1]


def test_demo_variants_refuses_to_guess_the_encoder_or_to_pretrain_into_another_run(tmp_path):
    parser = demo_variants.get_args_parser()
    with pytest.raises(UserError, match="the \\*_pretrained stages need an encoder.*got none"):
        demo_variants.main(parser.parse_args(["--output_dir", str(tmp_path / "a"), "--stages", "finetune_pretrained"]))
    with pytest.raises(UserError, match="give no --pretraining_from"):
        demo_variants.main(parser.parse_args(["--output_dir", str(tmp_path / "b"), "--stages", "pretrain",
                                              "--pretraining_from", str(tmp_path)]))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_demo_run_again_starts_each_stage_afresh(demo_run):
    """The runs of the first demo are replaced (--overwrite), not refused or appended to."""
    out, _ = demo_run
    data = json.loads((out / "results.json").read_text())["args"]["data_path"]
    result = run_program("demo.py", "--data_path", data, "--output_dir", out,
                         "--device", "cpu", "--num_workers", "0", "--batch_size", "16", "--finetune_batch_size", "16",
                         "--pretrain_epochs", "1", "--no-compile",
                         "--probe_epochs", "1", "--finetune_epochs", "1", "--downstream_images", "48",
                         "--knn_train_images", "40", "--no_random_init", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--overwrite: deleted the earlier run's checkpoints and logs" in result.stdout
    assert [json.loads(line)["epoch"] for line in (out / "pretrain" / "log.txt").read_text().splitlines()] == [0]
