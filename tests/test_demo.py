"""The end-to-end demo (README's main job) at toy size: every stage runs, the table and the figures come out."""
import json

import pytest

from conftest import run_program
from fakedata import make_fashion_mnist


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    data = make_fashion_mnist(root / "data", n_train=64, n_test=32)
    out = root / "out"
    result = run_program("demo.py", "--data_path", data, "--output_dir", out, "--device", "cpu",
                         "--num_workers", "0", "--batch_size", "16", "--pretrain_epochs", "2",
                         "--probe_epochs", "1", "--finetune_epochs", "1", "--downstream_images", "48", timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result.stdout


def test_demo_prints_and_writes_the_four_accuracies(demo_run):
    out, stdout = demo_run
    results = json.loads((out / "results.json").read_text())
    stages = {"linprobe_pretrained", "linprobe_random", "finetune_pretrained", "finetune_random"}
    assert set(results["accuracy"]) == stages
    for stage in stages:
        # the table reports what each stage's own log measured on the 32 test images (multiples of 1/32)
        logged = [json.loads(line) for line in (out / stage / "log.txt").read_text().splitlines()]
        assert results["accuracy"][stage] == logged[-1]["test_acc1"]
        assert (results["accuracy"][stage] * 32 / 100) == pytest.approx(round(results["accuracy"][stage] * 32 / 100))
    table = (out / "results.md").read_text()
    assert "| MAE pretrained |" in table and "| random init |" in table
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


def test_demo_leaves_reconstruction_figures_and_loss_curve(demo_run):
    out, stdout = demo_run
    assert sorted(p.name for p in (out / "pretrain" / "vis").glob("*.png")) == ["epoch_0000.png", "epoch_0001.png"]
    assert (out / "pretrain" / "loss_curve.png").stat().st_size > 0
    assert len((out / "pretrain" / "log.txt").read_text().splitlines()) == 2
    assert "loss curve" in stdout
