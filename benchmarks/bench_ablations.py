"""What each choice in the MAE training step buys: the step's pieces timed the way the package does them
against the obvious alternative, at the shapes of one step of ``--model`` (default ViT-B/16 MAE, batch 8).

    python benchmarks/bench_ablations.py
    python benchmarks/bench_ablations.py --threads 1 --json ablations.json

Each row times one piece, forward and backward where it has a backward, as the median of ``--reps`` runs after
two warm-up runs, and multiplies by how often a step does it (attention: once per block). The pieces:

* masking: the kept tokens gathered through an index expanded as a view (``random_masking``), against a
  materialised (N, kept, D) copy of the index (``repeat``);
* the decoder's unshuffle as ``forward_decoder`` does it (the mask tokens appended to the kept tokens, one gather
  with ``ids_restore``, the cls token put back first), against one gather from [cls, kept..., mask token] straight
  into the full-length sequence;
* attention: ``F.scaled_dot_product_attention`` (timm's fused path) against softmax(q kᵀ / √d) v written out;
* AdamW over the model's parameters: fused, foreach (multi-tensor) and for-loop implementations.

The masking and unshuffle rows are checked against the model before they are timed: ``random_masking`` and
``forward_decoder`` must run the timed operators (as torch dispatches them) and give the same tokens, or the
script stops with an error instead of timing something the model no longer does.

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
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

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
class _ReachedTheBlocks(Exception):
    pass


class OperatorLog(TorchDispatchMode):
    """The names of the aten operators run inside it, in order."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def contains_run(names, run) -> bool:
    """Whether ``run`` occurs in ``names`` as consecutive entries."""
    return any(names[i:i + len(run)] == run for i in range(len(names) - len(run) + 1))


def masking(model, n, length, dim, mask_ratio, reps):
    x = torch.randn(n, length, dim, requires_grad=True)
    noise = torch.rand(n, length)
    ids_keep = torch.argsort(noise, dim=1)[:, :int(length * (1 - mask_ratio))]

    def package():  # models_mae.MaskedAutoencoderViT.random_masking's gather
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))

    def materialised():
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).repeat(1, 1, dim))

    # random_masking must run the timed operators, one after the other, and keep the same tokens
    with torch.no_grad():
        with OperatorLog() as model_ops:
            kept = model.random_masking(x, mask_ratio, noise)[0]
        with OperatorLog() as package_ops:
            gathered = package()
        if not (contains_run(model_ops.names, package_ops.names) and torch.equal(gathered, kept)):
            raise RuntimeError("the masking row no longer times what random_masking does")
        assert torch.equal(gathered, materialised())
    return {"package": median_ms(fwd_bwd(package, x), reps), "other": median_ms(fwd_bwd(materialised, x), reps)}


def unshuffle(model, n, length, len_keep, reps):
    encoded = torch.randn(n, len_keep + 1, model.pos_embed.shape[-1])
    ids_restore = torch.argsort(torch.argsort(torch.rand(n, length), dim=1), dim=1)
    with torch.no_grad():
        embedded = model.decoder_embed(encoded)
    dim = embedded.shape[2]
    latent = embedded.clone().requires_grad_()
    token = model.mask_token.detach().clone().requires_grad_()

    def package():  # models_mae.MaskedAutoencoderViT.forward_decoder's unshuffle
        mask_tokens = token.expand(n, length - len_keep, -1)
        patches = torch.cat([latent[:, 1:, :], mask_tokens], dim=1)
        patches = torch.gather(patches, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        return torch.cat([latent[:, :1, :], patches], dim=1)

    def one_gather():
        # slot of each patch in [cls, kept..., token]: kept patches at 1 + their rank, removed ones at the token
        src = torch.cat([latent, token.expand(n, 1, -1)], dim=1)
        slot = torch.where(ids_restore < len_keep, ids_restore + 1, len_keep + 1)
        slot = torch.cat([slot.new_zeros(n, 1), slot], dim=1)
        return torch.gather(src, 1, slot.unsqueeze(-1).expand(-1, -1, dim))

    # the model's forward_decoder up to its first block must be the embedding, then the timed unshuffle's
    # operators, then the position table: the same aten operators in the same order and the same values
    seen = []

    def stop(module, inputs):
        seen.append(inputs[0])
        raise _ReachedTheBlocks

    hook = model.decoder_blocks[0].register_forward_pre_hook(stop)
    try:
        with torch.no_grad(), OperatorLog() as model_ops:
            try:
                model.forward_decoder(encoded, ids_restore)
            except _ReachedTheBlocks:
                pass
    finally:
        hook.remove()
    with torch.no_grad():
        with OperatorLog() as embed_ops:
            model.decoder_embed(encoded)
        with OperatorLog() as package_ops:
            unshuffled = package()
        if (model_ops.names != embed_ops.names + package_ops.names + ["add"]
                or not torch.equal(seen[0], unshuffled + model.decoder_pos_embed)):
            raise RuntimeError("the unshuffle row no longer times what forward_decoder does")
        assert torch.equal(unshuffled, one_gather())
    return {"package": median_ms(fwd_bwd(package, latent, token), reps),
            "other": median_ms(fwd_bwd(one_gather, latent, token), reps)}


def attention(n, heads, tokens, head_dim, reps):
    q, k, v = (torch.randn(n, heads, tokens, head_dim, requires_grad=True) for _ in range(3))

    def written_out():
        scores = (q * head_dim ** -0.5) @ k.transpose(-2, -1)
        return scores.softmax(dim=-1) @ v

    return {"package": median_ms(fwd_bwd(lambda: F.scaled_dot_product_attention(q, k, v), q, k, v), reps),
            "other": median_ms(fwd_bwd(written_out, q, k, v), reps)}


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

    def row(name, times, per_step, package="package", other="other"):
        rows.append({"piece": name, "per_step": per_step, "package": package, "other": other,
                     "package_ms": times[package] * per_step, "other_ms": times[other] * per_step})

    row("masking gather: expanded index vs materialised index",
        masking(model, n, length, dim, args.mask_ratio, args.reps), 1)
    row("decoder unshuffle: concat+gather+concat vs one gather", unshuffle(model, n, length, len_keep, args.reps), 1)
    row("encoder attention: SDPA vs written out", attention(n, enc_heads, len_keep + 1, dim // enc_heads, args.reps),
        len(model.blocks))
    row("decoder attention: SDPA vs written out", attention(n, dec_heads, length + 1, dec_dim // dec_heads, args.reps),
        len(model.decoder_blocks))
    optimizer = adamw(model, args.reps)
    row("AdamW: fused vs foreach", optimizer, 1, package="fused", other="foreach")
    row("AdamW: fused vs for-loop", optimizer, 1, package="fused", other="for-loop")

    report = {**machine(), "device": cpu_model(), "torch": torch.__version__, "threads": torch.get_num_threads(),
              "args": dict(vars(args)), "rows": rows}
    print(f"{report['device']}, torch {report['torch']}, {report['threads']} threads, {report['date']}")
    print(f"{args.model}, batch {n}, {args.input_size} px, mask ratio {args.mask_ratio}; ms per training step "
          f"(median of {args.reps} runs x times per step)")
    print(f"{'piece':<56}{'package':>10}{'other':>10}{'saved':>10}")
    for r in rows:
        saved = r["other_ms"] - r["package_ms"]
        print(f"{r['piece']:<56}{r['package_ms']:>10.2f}{r['other_ms']:>10.2f}{saved:>10.2f}")
    write_json(report, args.json)
    return report


if __name__ == "__main__":
    main(get_args_parser().parse_args())
