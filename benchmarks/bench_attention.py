"""Forward + backward of one attention call, fused kernel against timm's plain path, in fp32 and under bf16 autocast.

    python benchmarks/bench_attention.py            # CPU, MAE's shapes: ViT-B's encoder and decoder, the demo model's

``util.runtime.choose_attention`` picks the path from these figures: the fused kernel
(``F.scaled_dot_product_attention``) except under bf16 on a CPU. Median of ``--reps`` calls after 2 warm-up calls
(bench_ablations' timing).
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: the repository root holds the modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.bench_ablations import fwd_bwd, median_ms  # noqa: E402

SHAPES = {  # (batch, heads, tokens, head dim) as the models run them
    "ViT-B encoder, batch 8": (8, 12, 50, 64),
    "ViT-B decoder, batch 8": (8, 16, 197, 32),
    "demo encoder, batch 128": (128, 3, 13, 32),
    "demo decoder, batch 128": (128, 2, 50, 32),
}


def plain(q, k, v):  # timm's Attention with fused_attn=False
    return ((q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1) @ v


def time_ms(attention, shape, bf16: bool, reps: int) -> float:
    q, k, v = (torch.randn(*shape, requires_grad=True) for _ in range(3))

    def output():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            return attention(q, k, v).float()

    return median_ms(fwd_bwd(output, q, k, v), reps)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", default=15, type=int)
    args = parser.parse_args()
    print(f"{'shape (batch, heads, tokens, head dim)':<48}{'fp32 fused':>12}{'fp32 plain':>12}{'bf16 fused':>12}"
          f"{'bf16 plain':>12}   (ms, forward + backward, {torch.get_num_threads()} threads)")
    for name, shape in SHAPES.items():
        ms = [time_ms(fn, shape, bf16, args.reps) for bf16 in (False, True)
              for fn in (F.scaled_dot_product_attention, plain)]
        print(f"{name + ' ' + str(shape):<48}" + "".join(f"{m:>12.2f}" for m in ms))


if __name__ == "__main__":
    main()
