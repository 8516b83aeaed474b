"""The kNN monitor: the weighted kNN classifier against a brute-force reference, the monitor in a pretraining run, the
same accuracy on two processes as on one, a clear error on unlabelled data, and the per-iteration loss log."""
import json
import math

import pytest
import torch

import main_pretrain
from conftest import log_lines, run_in_process, run_program, SUBPROCESS_TIMEOUT, tiny_pretrain_argv
from fakedata import make_filelist, make_imagefolder
from util.checkpoint import load_pretrained
from util.datasets import build_dataset
from util.errors import UserError
from util.figures import STEP_LOG, read_log
from util.knn import K, TEMPERATURE, knn_accuracy, knn_scores
from util.runtime import build_model


def brute_force_scores(bank, bank_labels, queries, num_classes, k, temperature):
    """Each query's k most cosine-similar bank items, one at a time, add exp(similarity / T) to their class."""
    scores = torch.zeros(len(queries), num_classes, dtype=torch.float64)
    for q, query in enumerate(queries.double()):
        similarities = [float(query @ item.double() / (query.norm() * item.double().norm())) for item in bank]
        for i in sorted(range(len(bank)), key=lambda i: -similarities[i])[:k]:
            scores[q, bank_labels[i]] += math.exp(similarities[i] / temperature)
    return scores


@pytest.mark.parametrize("k, bank_size", [(K, 60), (5, 60), (K, 7)])  # k > bank size: every item votes
def test_knn_scores_equal_a_brute_force_reference(k, bank_size):
    generator = torch.Generator().manual_seed(k + bank_size)
    bank, queries = torch.randn(bank_size, 6, generator=generator), torch.randn(25, 6, generator=generator)
    bank_labels = torch.randint(0, 4, (bank_size,), generator=generator)
    scores = knn_scores(bank * 3.0, bank_labels, queries, num_classes=4, k=k, temperature=0.5, chunk=10)
    expected = brute_force_scores(bank, bank_labels, queries, 4, k, 0.5)
    torch.testing.assert_close(scores.double(), expected, rtol=1e-4, atol=0)


def test_knn_accuracy_counts_the_argmax_of_the_reference_scores():
    generator = torch.Generator().manual_seed(0)
    centres = torch.randn(3, 8, generator=generator)  # three noisy clusters: neither 0 % nor 100 %
    bank_labels, query_labels = torch.arange(90) % 3, torch.arange(40) % 3
    bank = centres[bank_labels] + 1.2 * torch.randn(90, 8, generator=generator)
    queries = centres[query_labels] + 1.2 * torch.randn(40, 8, generator=generator)
    expected = brute_force_scores(bank, bank_labels, queries, 3, K, TEMPERATURE).argmax(dim=1)
    accuracy = knn_accuracy(bank, bank_labels, queries, query_labels)
    assert accuracy == pytest.approx(100.0 * (expected == query_labels).double().mean().item())
    assert 40.0 < accuracy < 100.0


def features_by_hand(model, dataset):
    """Mean patch token of the encoder with no patch removed (random token order: the mean does not care)."""
    model.eval()
    with torch.no_grad():
        images = torch.stack([dataset[i][0] for i in range(len(dataset))])
        tokens, mask, _ = model.forward_encoder(images, 0.0)
    assert mask.sum() == 0
    return tokens[:, 1:].mean(dim=1), torch.tensor([dataset[i][1] for i in range(len(dataset))])


def test_monitor_logs_knn_acc1_of_the_trained_encoder_and_leaves_training_alone(imagefolder, tmp_path):
    monitored, plain = tmp_path / "knn", tmp_path / "plain"
    args = run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, monitored, "--epochs", "3", "--knn_freq", "2",
                                                            "--knn_train_images", "0"))
    lines = log_lines(monitored)
    assert ["knn_acc1" in line for line in lines] == [True, False, True]  # epochs 0 and 2 (every 2, and the last)
    model = build_model("mae_vit_tiny_patch4", img_size=32)
    load_pretrained(model, monitored / "checkpoint-last.pth")
    bank, bank_labels = features_by_hand(model, build_dataset("train", args))
    queries, query_labels = features_by_hand(model, build_dataset("val", args))
    expected = brute_force_scores(bank, bank_labels, queries, 2, K, TEMPERATURE).argmax(dim=1)
    assert lines[2]["knn_acc1"] == pytest.approx(100.0 * (expected == query_labels).double().mean().item())
    # the monitor draws nothing from the training's random streams: the losses are those of a run without it
    run_in_process(main_pretrain, tiny_pretrain_argv(imagefolder, plain, "--epochs", "3"))
    assert [line["train_loss"] for line in lines] == [line["train_loss"] for line in log_lines(plain)]
    # one line per iteration (16 images, batch 8: 2 a epoch), whose mean is the epoch's logged loss
    steps = read_log(monitored / STEP_LOG, key="step")
    assert [(s["epoch"], s["step"], s["steps"]) for s in steps] == [(e, i, 2) for e in range(3) for i in range(2)]
    for epoch, line in enumerate(lines):
        assert line["train_loss"] == pytest.approx(sum(s["loss"] for s in steps[2 * epoch:2 * epoch + 2]) / 2)
    assert (monitored / "loss_curve.png").stat().st_size > 0


def test_monitor_gives_the_same_accuracy_on_two_processes(tmp_path):
    # 15 images per split, 11 in the memory bank: both are padded when sharded over two ranks
    data = make_imagefolder(tmp_path / "data", num_classes=3, per_class=5)
    runs = {}
    for world in (1, 2):
        out = tmp_path / f"world{world}"
        # lr 0: the encoder stays the seeded initial one (DDP gives every rank rank 0's), so both runs embed alike
        argv = tiny_pretrain_argv(data, out, "--epochs", "1", "--batch_size", "4", "--lr", "0", "--knn_freq", "1",
                                  "--knn_train_images", "11", "--vis_freq", "0")
        launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"] if world == 2 else []
        result = run_program(*launcher, "main_pretrain.py", *argv, timeout=SUBPROCESS_TIMEOUT)
        assert result.returncode == 0, result.stderr[-3000:]
        assert "11 memory-bank and 15 query images" in result.stdout
        runs[world] = log_lines(out)[0]["knn_acc1"]
    assert runs[2] == runs[1]
    assert runs[1] * 15 / 100 == pytest.approx(round(runs[1] * 15 / 100))  # a count of the 15 queries


def test_unlabelled_data_is_a_one_line_error_before_training(tmp_path):
    data = make_filelist(tmp_path / "data", labelled=False)
    argv = tiny_pretrain_argv(data, tmp_path / "out", "--dataset", "filelist", "--knn_freq", "1")
    with pytest.raises(UserError, match="--knn_freq needs labelled images, but the train split of --dataset filelist"):
        run_in_process(main_pretrain, argv)
    assert not (tmp_path / "out" / "log.txt").exists()


def test_step_log_keeps_the_last_line_of_a_step_written_twice(tmp_path):
    lines = [{"epoch": 0, "step": 0, "steps": 2, "loss": 1.0}, {"epoch": 0, "step": 1, "steps": 2, "loss": 0.9},
             {"epoch": 0, "step": 1, "steps": 2, "loss": 0.8}, {"epoch": 1, "step": 0, "steps": 2, "loss": 0.7}]
    (tmp_path / STEP_LOG).write_text("".join(json.dumps(line) + "\n" for line in lines) + '{"epoch": 1, "st')
    assert [s["loss"] for s in read_log(tmp_path / STEP_LOG, key="step")] == [1.0, 0.8, 0.7]
