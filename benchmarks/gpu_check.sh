#!/usr/bin/env bash
# One-GPU check of every CUDA path, in at most 8 minutes:
#
#     bash benchmarks/gpu_check.sh [OUT_DIR]          # default OUT_DIR: gpu_check_out
#     GPU_CHECK_DRY=1 bash benchmarks/gpu_check.sh    # the same command lines on CPU, tiny sizes (gloo; fp16 -> none)
#
# 1. The ViT-L/16 pretraining step, timed by benchmarks/bench_step.py (bf16, batch 64; eager, then --compile):
#    images/s, FLOP/s as a fraction of the bf16 matmul peak measured in the same run, peak memory. bench_step
#    times the bare single-process step (no DDP wrapper, and it has no FSDP option), which the table says.
# 2. Short main_pretrain.py runs (one epoch of 4 iterations, ViT-B/16 at 224 px on a generated imagefolder),
#    each under torchrun --nproc_per_node=1: --amp bf16, --amp fp16 (GradScaler), --grad_ckpt, --compile, --fsdp
#    (bf16 MixedPrecisionPolicy), --fsdp --grad_ckpt in fp32. Every run steps with fused AdamW (util.runtime.adamw).
#    One process builds a process group (nccl) only under --fsdp: without it the program trains unwrapped, so DDP
#    itself is not exercised (nccl refuses two ranks on one GPU). A run passes when it exits 0, logs a finite loss
#    and writes a checkpoint.
#
# Each step has a time limit, and a step that could end past the 8 minutes is skipped (and reported as such).
# Prints one table; writes OUT_DIR/gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python}
OUT=${1:-gpu_check_out}
DRY=${GPU_CHECK_DRY:-0}
BUDGET_S=480
START=$(date +%s)
mkdir -p "$OUT/runs"
RESULTS="$OUT/results.tsv"
: > "$RESULTS"

if [ "$DRY" = 1 ]; then
    DEVICE=cpu; MODEL=mae_vit_tiny_patch4; SIZE=32; BATCH=8; WORKERS=0; FP16=none
    BENCH=(--model mae_vit_tiny_patch4 --input_size 32 --batch_size 4 --device cpu --steps 1 --warmup 1
           --peak_sizes 64 --peak_reps 1)
else
    DEVICE=cuda; MODEL=mae_vit_base_patch16; SIZE=224; BATCH=32; WORKERS=4; FP16=fp16
    BENCH=(--model mae_vit_large_patch16 --input_size 224 --batch_size 64 --device cuda --steps 10 --warmup 3)
fi

DATA=$("$PY" -c "import sys; sys.path.insert(0, 'tests'); from fakedata import make_imagefolder
print(make_imagefolder('$OUT', num_classes=2, per_class=64, size=$SIZE))") || { echo "no data written"; exit 1; }

# step NAME LIMIT_S COMMAND...: run it (output in OUT/runs/NAME.out) unless it could end past the budget
step() {
    local name=$1 limit=$2; shift 2
    local elapsed=$(( $(date +%s) - START ))
    if (( elapsed + limit > BUDGET_S )); then
        printf '%s\tskipped\t0\n' "$name" >> "$RESULTS"; echo "== $name: skipped (${elapsed}s used of ${BUDGET_S}s)"
        return
    fi
    echo "== $name: $*"
    local t0=$(date +%s) rc=0
    timeout "$limit" "$@" > "$OUT/runs/$name.out" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$RESULTS"
    tail -n 3 "$OUT/runs/$name.out"
}

bench() {  # bench NAME LIMIT_S [extra bench_step flags]
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" "$PY" benchmarks/bench_step.py "${BENCH[@]}" --amp bf16 --mode pretrain \
        --no-compare_mask_tokens --no-vs_fp32 --json "$OUT/runs/$name.json" "$@"
}

pretrain() {  # pretrain NAME LIMIT_S [extra main_pretrain flags]
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" "$PY" -m torch.distributed.run --standalone --nproc_per_node=1 main_pretrain.py \
        --model "$MODEL" --input_size "$SIZE" --batch_size "$BATCH" --epochs 1 --warmup_epochs 0 \
        --max_train_images $(( 4 * BATCH )) --data_path "$DATA" --num_workers "$WORKERS" --device "$DEVICE" \
        --output_dir "$OUT/runs/$name" --log_dir '' --overwrite --print_freq 1 --knn_freq 0 --vis_freq 0 "$@"
}

bench    vitl-step-bf16          150
pretrain bf16                     90 --amp bf16
pretrain fp16                     90 --amp "$FP16"
pretrain fsdp-bf16                90 --fsdp --amp bf16
pretrain fsdp-fp32-grad_ckpt      90 --fsdp --amp none --grad_ckpt
pretrain bf16-grad_ckpt           90 --amp bf16 --grad_ckpt
pretrain bf16-compile            180 --amp bf16 --compile
bench    vitl-step-bf16-compile  180 --compile

"$PY" - "$OUT" "$DRY" <<'EOF'
import json, math, pathlib, sys

import torch

out, dry = pathlib.Path(sys.argv[1]), sys.argv[2] == "1"
device = "CPU (dry run)" if dry else torch.cuda.get_device_name(0)
rows = []
for line in (out / "results.tsv").read_text().splitlines():
    name, rc, seconds = line.split("\t")
    row = dict(name=name, seconds=int(seconds), status="skipped" if rc == "skipped" else
               "ok" if rc == "0" else "timed out" if rc == "124" else f"failed (exit {rc})")
    run = out / "runs" / name
    log = run / "log.txt"
    if log.is_file() and log.read_text().strip():
        row["train_loss"] = json.loads(log.read_text().splitlines()[-1]).get("train_loss")
        row["checkpoint"] = any(run.glob("checkpoint-*"))
        console = (out / "runs" / f"{name}.out").read_text()
        row["backend"] = ("nccl group" if ", nccl)" in console else "gloo group" if ", gloo)" in console
                          else "no process group")
        if row["status"] == "ok" and not (row["checkpoint"] and row["train_loss"] is not None
                                          and math.isfinite(row["train_loss"])):
            row["status"] = "no finite loss or no checkpoint"
    elif (out / "runs" / f"{name}.json").is_file():
        bench = json.loads((out / "runs" / f"{name}.json").read_text())
        step = bench["runs"][0]
        row.update(images_per_s=step["images_per_s"], fraction_of_peak=step["fraction_of_peak"],
                   max_memory_gib=step.get("max_memory_allocated_gib"), train_loss=step["final_loss"],
                   notes=f"{step['model']}, batch {bench['args']['batch_size']}, {bench['args']['input_size']} px")
    elif row["status"] == "ok":
        row["status"] = "no log"
    rows.append(row)

print(f"\n{device}, torch {torch.__version__}")
print(f"{'check':<26}{'status':<34}{'s':>5}{'loss':>9}{'img/s':>9}{'of bf16 peak':>14}{'peak GiB':>10}  notes")
for r in rows:
    loss = f"{r['train_loss']:.4f}" if r.get("train_loss") is not None else "-"
    memory = f"{r['max_memory_gib']:>10.2f}" if r.get("max_memory_gib") is not None else f"{'-':>10}"
    speed = f"{r['images_per_s']:>9.1f}{r['fraction_of_peak']:>14.1%}{memory}" if "images_per_s" in r else (
        f"{'-':>9}{'-':>14}{'-':>10}")
    notes = (f"{r['backend']}, checkpoint {'written' if r['checkpoint'] else 'missing'}" if "backend" in r
             else r.get("notes", ""))
    print(f"{r['name']:<26}{r['status']:<34}{r['seconds']:>5}{loss:>9}{speed}  {notes}")
print("vitl-step-*: benchmarks/bench_step.py, the pretraining step in bf16 (of peak: of the bf16 matmul peak measured "
      "in the same run); the bare single-process step: no DDP wrapper, and bench_step has no FSDP option, so no FSDP "
      "step time is measured here")
print("the other rows: main_pretrain.py under torchrun --nproc_per_node=1, 4 iterations each, fused AdamW; one "
      "process has a process group only under --fsdp, so DDP itself is not exercised on one GPU")
report = dict(device=device, torch=torch.__version__, dry_run=dry, rows=rows)
(out / "gpu_check.json").write_text(json.dumps(report, indent=1))
sys.exit(0 if all(r["status"] == "ok" for r in rows) else 1)
EOF
