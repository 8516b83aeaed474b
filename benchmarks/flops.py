"""FLOPs of a training step and the dense-matmul peak they are compared with."""
from __future__ import annotations

import statistics
import time

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

aten = torch.ops.aten


def _cpu_sdpa_flops(query, key, value, *args, **kwargs):
    return sdpa_flop_count(query.shape, key.shape, value.shape)


def _cpu_sdpa_backward_flops(grad_out, query, key, value, *args, **kwargs):
    return sdpa_backward_flop_count(grad_out.shape, query.shape, key.shape, value.shape)


_cpu_sdpa_flops._get_raw = True
_cpu_sdpa_backward_flops._get_raw = True
# FlopCounterMode knows the CUDA attention kernels but not the CPU flash kernel that SDPA dispatches to on
# CPU; without these the attention FLOPs of a CPU step would silently count as zero.
EXTRA_FLOP_FORMULAS = {
    aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_flops,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward_flops,
}


def count_flops(step) -> int:
    """FLOPs of one call of ``step`` (matmuls, convolutions and attention; 2 FLOPs per multiply-add)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        step()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compute_dtype(amp: str) -> torch.dtype:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp, torch.float32)


class MatmulPeak:
    """The dense-matmul peak: a square ``n x n @ n x n`` matmul in the step's compute dtype.

    ``sweep`` times each candidate size (median of ``reps``) and keeps the fastest; ``probe`` times one more
    matmul of that size. The benchmark probes after every timed step, so each step is compared with the
    peak measured seconds apart: on a shared machine the load changes from minute to minute, and a peak
    taken only at the start would turn that drift into a wrong fraction.
    """

    def __init__(self, device: torch.device, dtype: torch.dtype):
        self.device, self.dtype = device, dtype
        self.by_size, self.samples, self.size = {}, [], None

    def _time_one(self, a, b) -> float:
        synchronize(self.device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        synchronize(self.device)
        return time.perf_counter() - t0

    def _operands(self, n):
        return (torch.randn(n, n, device=self.device, dtype=self.dtype),
                torch.randn(n, n, device=self.device, dtype=self.dtype))

    def sweep(self, sizes, reps: int) -> None:
        for n in sizes:
            a, b = self._operands(n)
            self._time_one(a, b)  # warm-up
            self.by_size[n] = 2 * n**3 / statistics.median(self._time_one(a, b) for _ in range(reps))
        self.size = max(self.by_size, key=self.by_size.get)
        self.samples.append(self.by_size[self.size])
        self._a, self._b = self._operands(self.size)

    def probe(self) -> float:
        flops_per_s = 2 * self.size**3 / self._time_one(self._a, self._b)
        self.samples.append(flops_per_s)
        return flops_per_s

    @property
    def flops_per_s(self) -> float:
        return statistics.median(self.samples)

    def report(self, reps: int) -> dict:
        return {"dtype": str(self.dtype).replace("torch.", ""), "size": self.size, "flops_per_s": self.flops_per_s,
                "flops_per_s_by_size": {str(k): v for k, v in self.by_size.items()}, "reps": reps,
                "probes": len(self.samples) - 1}
