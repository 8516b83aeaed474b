"""What each choice in the MAE training step buys: the step's pieces timed the way the package does them
against the obvious alternative, at the shapes of one step of ``--model`` (default ViT-B/16 MAE, batch 8).

    python benchmarks/bench_ablations.py
    python benchmarks/bench_ablations.py --threads 1 --json ablations.json

Each row times one piece, forward and backward where it has a backward, as the median of ``--reps`` runs after
two warm-up runs, and multiplies by how often a step does it (attention: once per block). The pieces:

* masking: the kept tokens gathered through an index expanded as a view, against a materialised
  (N, kept, D) copy of the index (``repeat``);
* the decoder's unshuffle: one gather from [cls, kept..., mask token] straight into place, against the
  package's earlier mask tokens + concatenation + gather + concatenation at full length;
* attention: ``F.scaled_dot_product_attention`` (timm's fused path) against softmax(q kᵀ / √d) v written out;
* AdamW over the model's parameters: fused, foreach (multi-tensor) and for-loop implementations.

Host synchronisation is not a row: on a CPU every operation has finished when it returns, so a ``loss.item()``
per step costs nothing measurable here; on a GPU it stalls the queue (the training step reads nothing back).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # flat layout: the repository root holds the modules

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.common import cpu_model, machine, write_json  # noqa: E402
from util.runtime import build_model  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser("MAE step ablations", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mae_vit_base_patch16")
    p.add_argument("--batch_size", default=8, type=int)
    p.add_argument("--input_size", default=224, type=int)
    p.add_argument("--mask_ratio", default=0.75, type=float)
    p.add_argument("--reps", default=20, type=int, help="timed runs per variant (the median is reported)")
    p.add_argument("--threads", default=None, type=int, help="torch.set_num_threads (default: leave as is)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p


def median_ms(fn, reps: int) -> float:
    for _ in range(2):
        fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fwd_bwd(make_output, *leaves):
    def run():
        for leaf in leaves:
            leaf.grad = None
        make_output().sum().backward()
    return run


# ------------------------------------------------------------------------------------------ the pieces
def masking(n, length, dim, len_keep, reps):
    x = torch.randn(n, length, dim, requires_grad=True)
    ids_keep = torch.argsort(torch.rand(n, length), dim=1)[:, :len_keep]
    view = fwd_bwd(lambda: torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim)), x)
    copy = fwd_bwd(lambda: torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim)), x)
    return {"new": median_ms(view, reps), "old": median_ms(copy, reps)}


def unshuffle(n, length, dim, len_keep, reps):
    latent = torch.randn(n, len_keep + 1, dim, requires_grad=True)
    token = torch.randn(1, 1, dim, requires_grad=True)
    ids_restore = torch.argsort(torch.argsort(torch.rand(n, length), dim=1), dim=1)

    def one_gather():  # models_mae.forward_decoder
        src = torch.cat([latent, token.expand(n, 1, -1)], dim=1)
        slot = torch.where(ids_restore < len_keep, ids_restore + 1, len_keep + 1)
        slot = torch.cat([slot.new_zeros(n, 1), slot], dim=1)
        return torch.gather(src, 1, slot.unsqueeze(-1).expand(-1, -1, dim))

    def full_length():  # before commit a1bd006
        patches = torch.cat([latent[:, 1:], token.expand(n, length - len_keep, -1)], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([latent[:, :1], patches], dim=1)

    assert torch.equal(one_gather(), full_length())
    return {"new": median_ms(fwd_bwd(one_gather, latent, token), reps),
            "old": median_ms(fwd_bwd(full_length, latent, token), reps)}


def attention(n, heads, tokens, head_dim, reps):
    q, k, v = (torch.randn(n, heads, tokens, head_dim, requires_grad=True) for _ in range(3))

    def written_out():
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1) @ v

    return {"new": median_ms(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), q, k, v), reps),
            "old": median_ms(fwd_bwd(written_out, q, k, v), reps)}


def adamw(model, reps):
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out = {}
    for impl, flags in (("fused", dict(fused=True)), ("foreach", dict(foreach=True)), ("for-loop", dict(foreach=False))):
        optimizer = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, **flags)
        out[impl] = median_ms(optimizer.step, max(3, reps // 4))
        del optimizer
    return out


# ------------------------------------------------------------------------------------------ main
def main(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(args.model, img_size=args.input_size)
    n = args.batch_size
    length = model.patch_embed.num_patches
    len_keep = int(length * (1 - args.mask_ratio))
    dim, dec_dim = model.pos_embed.shape[-1], model.decoder_pos_embed.shape[-1]
    enc_heads, dec_heads = model.blocks[0].attn.num_heads, model.decoder_blocks[0].attn.num_heads
    rows = []

    def row(name, times, per_step, new="new", old="old"):
        rows.append({"piece": name, "per_step": per_step, "new": new, "old": old,
                     "new_ms": times[new] * per_step, "old_ms": times[old] * per_step})

    row("masking gather: expanded index vs materialised index", masking(n, length, dim, len_keep, args.reps), 1)
    row("decoder unshuffle: one gather vs concat+gather+concat", unshuffle(n, length, dec_dim, len_keep, args.reps), 1)
    row("encoder attention: SDPA vs written out", attention(n, enc_heads, len_keep + 1, dim // enc_heads, args.reps),
        len(model.blocks))
    row("decoder attention: SDPA vs written out", attention(n, dec_heads, length + 1, dec_dim // dec_heads, args.reps),
        len(model.decoder_blocks))
    optimizer = adamw(model, args.reps)
    row("AdamW: fused vs foreach", optimizer, 1, new="fused", old="foreach")
    row("AdamW: fused vs for-loop", optimizer, 1, new="fused", old="for-loop")

    report = {**machine(), "device": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "args": dict(vars(args)), "rows": rows}
    print(f"{report['device']}, torch {report['torch']}, {report['threads']} threads, {report['date']}")
    print(f"{args.model}, batch {n}, {args.input_size} px, mask ratio {args.mask_ratio}; ms per training step "
          f"(median of {args.reps} runs x times per step)")
    print(f"{'piece':<56}{'package':>10}{'other':>10}{'saved':>10}")
    for r in rows:
        print(f"{r['piece']:<56}{r['new_ms']:>10.2f}{r['old_ms']:>10.2f}{r['old_ms'] - r['new_ms']:>10.2f}")
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
