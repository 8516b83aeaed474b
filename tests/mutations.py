"""Proof by mutation: each test named below must fail when the realistic bug next to it is put into the code.

    .venv/bin/python tests/mutations.py              # every mutation (several minutes on 2 cores)
    .venv/bin/python tests/mutations.py -k ddp -k lr_scale   # only those whose name contains a -k word
    .venv/bin/python tests/mutations.py --list

For each mutation (name, file, old text, new text, test node id) the repository is copied to a temporary
directory (without .venv, .git and caches), ``old`` is replaced by ``new`` in ``file`` (it must occur exactly
once), and the test runs there with the repository's python. PASS: the test failed (the mutation is killed);
FAIL: it passed (the mutation survived). Before the mutations, each named test runs once on an unmutated copy
and must pass there (otherwise a "kill" would prove nothing; ``--no-baseline`` skips this). The exit status is
non-zero when any mutation survives or anything could not be checked.

Not a pytest module (no ``test_`` prefix): it runs tests itself.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
PYTHON = REPO / ".venv" / "bin" / "python"
IGNORED = (".venv", ".git", "__pycache__", ".pytest_cache", "*.egg-info", "output_dir", "demo_output", "runs", "jobs",
           "build", "*.pth")
TIMEOUT = float(os.environ.get("MAE_MUTATION_TIMEOUT", 1800))  # seconds per test run


class Mutation(NamedTuple):
    name: str
    file: str
    old: str
    new: str
    test: str


CLS = "tests/test_classify.py::"
CKPT = "tests/test_checkpoint.py::"
PRE = "tests/test_pretrain.py::"
TGT = "tests/test_targets.py::"
TRN = "tests/test_training.py::"
VIS = "tests/test_visualize.py::"
DATA = "tests/test_datasets.py::"

MUTATIONS = [
    # 1. layer-wise lr decay as main_finetune builds and applies it
    Mutation("lr_scale dropped in adjust_learning_rate", "util/lr_sched.py",
             'group["lr"] = lr * group.get("lr_scale", 1.0)', 'group["lr"] = lr',
             CLS + "test_layer_decay_reaches_each_parameter_update_as_main_finetune_builds_it[--global_pool]"),
    Mutation("timm's param_groups_layer_decay in main_finetune (final norm at layer_decay x lr)", "main_finetune.py",
             "from util.lr_decay import param_groups_layer_decay", "from timm.optim import param_groups_layer_decay",
             CLS + "test_layer_decay_reaches_each_parameter_update_as_main_finetune_builds_it[--cls_token]"),
    # 2. position tables resampled as the original
    Mutation("resample with antialias", "util/checkpoint.py",
             'interpolation="bicubic", antialias=False', 'interpolation="bicubic", antialias=True',
             CKPT + "test_position_tables_14x14_resample_to_16x16"),
    Mutation("resample bilinear", "util/checkpoint.py",
             'interpolation="bicubic", antialias=False', 'interpolation="bilinear", antialias=False',
             CKPT + "test_position_tables_14x14_resample_to_16x16"),
    Mutation("resample a transposed grid", "util/checkpoint.py",
             "    return resample_abs_pos_embed(table, new_size=list(grid)",
             "    table = torch.cat([table[:, :1], table[:, 1:].reshape(1, side, side, -1).transpose(1, 2)"
             ".reshape(1, side * side, -1)], dim=1)\n"
             "    return resample_abs_pos_embed(table, new_size=list(grid)",
             CKPT + "test_position_tables_14x14_resample_to_16x16"),
    Mutation("resample with antialias (non-square grid)", "util/checkpoint.py",
             'interpolation="bicubic", antialias=False', 'interpolation="bicubic", antialias=True',
             CKPT + "test_position_table_14x14_resamples_to_a_non_square_12x16_grid"),
    # 5. the linear probe's head learns (BatchNorm's running mean moves even at lr 0)
    Mutation("linear probe at learning rate 0", "main_linprobe.py",
             "    set_effective_lr(args, distributed.get_world_size())\n    optimizer = Lars(",
             "    set_effective_lr(args, distributed.get_world_size())\n    args.lr = 0.0\n    optimizer = Lars(",
             CLS + "test_linear_probe_leaves_every_encoder_tensor_bit_identical"),
    Mutation("linear probe (global pool) at learning rate 0", "main_linprobe.py",
             "    set_effective_lr(args, distributed.get_world_size())\n    optimizer = Lars(",
             "    set_effective_lr(args, distributed.get_world_size())\n    args.lr = 0.0\n    optimizer = Lars(",
             CLS + "test_linear_probe_with_global_pool_learns_only_the_head"),
    # 6. --dist_eval sums every rank's counts
    Mutation("dist_eval reduces only the image count", "engine.py",
             "        torch.distributed.all_reduce(totals)", "        torch.distributed.all_reduce(totals[3:])",
             CLS + "test_dist_eval_under_torchrun_two_processes"),
    # 7. gradients are averaged over processes
    Mutation("no DDP wrap (each rank trains alone)", "util/runtime.py",
             "    if args.distributed:\n        wrapped = torch.nn.parallel.DistributedDataParallel",
             "    if False:\n        wrapped = torch.nn.parallel.DistributedDataParallel",
             PRE + "test_torchrun_two_processes_gloo"),
    Mutation("DDP never all-reduces (no_sync on every step)", "engine.py",
             "with contextlib.nullcontext() if update else no_sync():", "with no_sync():",
             PRE + "test_torchrun_two_processes_gloo"),
    Mutation("no DDP wrap, two nodes", "util/runtime.py",
             "    if args.distributed:\n        wrapped = torch.nn.parallel.DistributedDataParallel",
             "    if False:\n        wrapped = torch.nn.parallel.DistributedDataParallel",
             PRE + "test_torchrun_two_nodes_static_rendezvous"),
    # team: gradient accumulation's leftover micro-batches
    Mutation("leftover micro-batches make an update", "engine.py",
             "update = (step + 1) % accum_iter == 0", "update = (step + 1) % accum_iter == 0 or step + 1 == steps",
             PRE + "test_leftover_micro_batches_make_no_update"),
    # 8. HOG's Gaussian spatial weighting
    Mutation("HOG without the Gaussian weighting", "util/targets.py",
             "magnitude = torch.hypot(gx, gy) * patch_gaussian(h, w, patch, imgs.device, imgs.dtype)",
             "magnitude = torch.hypot(gx, gy)",
             TGT + "test_hog_gaussian_weighting_changes_the_histogram_as_computed_by_hand"),
    Mutation("HOG Gaussian of std patch/4", "util/targets.py",
             "bump = torch.exp(-0.5 * (offset / (patch / 2)) ** 2)", "bump = torch.exp(-0.5 * (offset / (patch / 4)) ** 2)",
             TGT + "test_hog_gaussian_weighting_changes_the_histogram_as_computed_by_hand"),
    # 9. teacher features resampled to the student's grid
    Mutation("teacher features resampled nearest", "util/targets.py",
             'feats = F.interpolate(feats, size=self.grid, mode="bilinear", align_corners=False)',
             'feats = F.interpolate(feats, size=self.grid, mode="nearest")',
             TGT + "test_teacher_features_on_another_grid_are_resampled_bilinearly[8-8]"),
    Mutation("teacher features resampled with align_corners", "util/targets.py",
             'feats = F.interpolate(feats, size=self.grid, mode="bilinear", align_corners=False)',
             'feats = F.interpolate(feats, size=self.grid, mode="bilinear", align_corners=True)',
             TGT + "test_teacher_features_on_another_grid_are_resampled_bilinearly[8-8]"),
    Mutation("teacher features in column-major order", "util/targets.py",
             "feats = feats.flatten(2).transpose(1, 2)  # (N, L, D)",
             "feats = feats.transpose(2, 3).flatten(2).transpose(1, 2)  # (N, L, D)",
             TGT + "test_teacher_features_on_another_grid_are_resampled_bilinearly[6-8]"),
    # 10. --finetune loads the checkpoint
    Mutation("--finetune ignored", "main_finetune.py",
             "    if args.finetune and not args.eval:\n        load_pretrained(",
             "    if False:\n        load_pretrained(",
             CLS + "test_finetuning_from_a_pretraining_checkpoint_beats_chance"),
    # README promises (tests/test_training.py)
    Mutation("mixup targets without label smoothing", "main_finetune.py",
             "label_smoothing=args.smoothing, num_classes=args.nb_classes)",
             "label_smoothing=0.0, num_classes=args.nb_classes)",
             TRN + "test_mixup_and_cutmix_train_on_mixed_soft_targets"),
    Mutation("odd batch with mixup not caught", "main_finetune.py",
             "        if args.batch_size % 2:\n", "        if False:\n",
             TRN + "test_mixup_with_an_odd_batch_size_is_a_one_line_error"),
    Mutation("mid-epoch checkpoint one step behind", "engine.py",
             "next_step=step + 1)", "next_step=step)",
             TRN + "test_resuming_a_mid_epoch_checkpoint_is_bit_identical"),
    Mutation("RNG states not restored on resume", "util/checkpoint.py",
             "        _set_rng_state(rng[distributed.get_rank()])\n", "        pass\n",
             TRN + "test_resuming_a_mid_epoch_checkpoint_is_bit_identical"),
    Mutation("lr schedule per epoch instead of per iteration", "engine.py",
             "lr = lr_sched.adjust_learning_rate(optimizer, step / steps + epoch, args)",
             "lr = lr_sched.adjust_learning_rate(optimizer, epoch, args)",
             TRN + "test_warmup_cosine_schedule_and_blr_scaling_as_pretraining_applies_them"),
    Mutation("blr scaled without accum_iter", "util/lr_sched.py",
             "eff_batch = args.batch_size * args.accum_iter * world_size", "eff_batch = args.batch_size * world_size",
             TRN + "test_warmup_cosine_schedule_and_blr_scaling_as_pretraining_applies_them"),
    Mutation("full-cycle cosine", "util/lr_sched.py",
             "math.cos(math.pi * min(progress, 1.0))", "math.cos(2 * math.pi * min(progress, 1.0))",
             TRN + "test_warmup_cosine_schedule_and_blr_scaling_as_pretraining_applies_them"),
    Mutation("pretraining decays the tokens", "main_pretrain.py",
             "param_groups_weight_decay(model, args.weight_decay, no_weight_decay_list=model.no_weight_decay())",
             "param_groups_weight_decay(model, args.weight_decay)",
             TRN + "test_pretraining_decays_no_tokens_norms_or_biases"),
    Mutation("--amp bf16 ignored", "util/amp.py",
             '    if amp == "none":\n        return contextlib.nullcontext()',
             '    if True:\n        return contextlib.nullcontext()',
             TRN + "test_pretraining_under_bf16_autocast"),
    Mutation("--compile ignored", "util/runtime.py",
             "    if args.compile:\n", "    if False:\n",
             TRN + "test_pretraining_with_compile"),
    # figures: the norm-pix de-normalisation and the log reading behind the loss curve
    Mutation("norm-pix prediction shown without de-normalisation", "util/figures.py",
             "    if model.norm_pix_loss:  # the decoder predicts", "    if False:  # the decoder predicts",
             VIS + "test_grid_columns_are_input_masked_input_prediction_and_pasted[True]"),
    Mutation("loss curve keeps the first line of an epoch", "util/figures.py",
             "                by_epoch[record[\"epoch\"]] = record", "                by_epoch.setdefault(record[\"epoch\"], record)",
             VIS + "test_loss_curve_reads_the_last_line_of_each_epoch_and_skips_torn_lines"),
    # the recipe fixes: evaluation crop_pct, the probe's crop, the from-scratch class token
    Mutation("evaluation always at crop_pct 224/256", "util/datasets.py",
             "crop_pct = 224 / 256 if size <= 224 else 1.0", "crop_pct = 224 / 256",
             DATA + "test_large_eval_transform_crop_pct_follows_the_original[448-448]"),
    Mutation("linear probe with torchvision's retrying crop", "util/datasets.py",
             ", crop=SingleDrawRandomResizedCrop)", ")",
             DATA + "test_linprobe_crop_is_the_originals_single_draw_crop"),
    Mutation("class token left at timm's normal(1e-6)", "models_vit.py",
             "    trunc_normal_(model.cls_token, std=0.02)", "    pass",
             "tests/test_recipes.py::test_from_scratch_class_token_is_trunc_normal_002_as_the_original"),
]


def copy_repo(dest: Path) -> None:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns(*IGNORED), symlinks=True)


def run_test(root: Path, node: str) -> tuple[int, str, float]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    start = time.time()
    try:
        result = subprocess.run([str(python), "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", node], cwd=root,
                                env=env, capture_output=True, text=True, timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        return -1, f"timed out after {TIMEOUT:.0f} s", time.time() - start
    return result.returncode, result.stdout[-3000:] + result.stderr[-2000:], time.time() - start


def check_imports_from_copy(root: Path) -> None:
    """The copy's modules, not the checkout's (the package is installed editable), must be the ones tested."""
    python = PYTHON if PYTHON.exists() else Path(sys.executable)
    probe = ("import engine, main_finetune, util.lr_sched, sys; "
             "print(engine.__file__); print(main_finetune.__file__); print(util.lr_sched.__file__)")
    out = subprocess.run([str(python), "-c", probe], cwd=root, capture_output=True, text=True, check=True).stdout
    if not all(Path(line).resolve().is_relative_to(root.resolve()) for line in out.split()):
        sys.exit(f"the copy in {root} imports modules from elsewhere:\n{out}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", action="append", default=[], help="run only mutations whose name contains this")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip running each test on an unmutated copy")
    parser.add_argument("-v", action="store_true", help="show each test run's output tail")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if not args.k or any(k.lower() in m.name.lower() for k in args.k)]
    if args.list:
        for m in chosen:
            print(f"{m.name:60s} {m.file:22s} {m.test}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="mae-mutations-") as tmp:
        tmp = Path(tmp)
        baseline_ok = {}
        if not args.no_baseline:
            clean = tmp / "clean"
            copy_repo(clean)
            check_imports_from_copy(clean)
            for node in dict.fromkeys(m.test for m in chosen):
                rc, out, took = run_test(clean, node)
                baseline_ok[node] = rc == 0
                print(f"baseline {'ok  ' if rc == 0 else 'FAILS'} {took:6.1f} s  {node}", flush=True)
                if rc != 0 or args.v:
                    print(out)
        for i, m in enumerate(chosen):
            root = tmp / f"m{i}"
            copy_repo(root)
            path = root / m.file
            text = path.read_text()
            count = text.count(m.old)
            if count != 1:
                results.append((m, "ERROR", f"old text found {count} times in {m.file} (stale mutation)", 0.0))
            elif baseline_ok.get(m.test, True) is False:
                results.append((m, "ERROR", "the test fails without the mutation", 0.0))
            else:
                path.write_text(text.replace(m.old, m.new))
                rc, out, took = run_test(root, m.test)
                if rc == 1:
                    reason = next((line[1:].strip() for line in out.splitlines() if line.startswith("E ")), "")
                    status, note = "PASS", f"killed: {reason[:150]}" if reason else "killed: the test failed"
                elif rc == 2:
                    status, note = "PASS", "killed: the test errored (collection or interruption)"
                elif rc == 0:
                    status, note = "FAIL", "survived: the test passed"
                else:
                    status, note = "ERROR", f"pytest exit status {rc}"
                if args.v or status != "PASS":
                    print(out)
                results.append((m, status, note, took))
            m_, status, note, took = results[-1]
            print(f"{status:5s} {took:6.1f} s  {m.name}  [{m.test}]  {note}", flush=True)
            shutil.rmtree(root, ignore_errors=True)

    killed = sum(1 for r in results if r[1] == "PASS")
    print(f"\nsummary: {killed}/{len(results)} mutations killed, "
          f"{sum(1 for r in results if r[1] == 'FAIL')} survived, {sum(1 for r in results if r[1] == 'ERROR')} errors")
    for m, status, note, _ in results:
        print(f"  {status:5s} {m.name} -> {m.test.split('::', 1)[1]}")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
