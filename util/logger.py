"""Progress lines, the per-epoch ``log.txt`` and TensorBoard scalars.

Meters accept tensors and keep them on their device: a value is read back to the host only when a progress
line is printed or the epoch ends, so logging does not force a synchronisation every iteration.
"""
from __future__ import annotations

import datetime
import json
import os
import time
from collections import deque

import torch

from util import distributed
from util.errors import UserError


def _to_float(value) -> float:
    return value.item() if isinstance(value, torch.Tensor) else float(value)


class Meter:
    """A running mean over the epoch and the median of the last ``window`` values."""

    def __init__(self, window=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.window = deque(maxlen=window)
        self.total = 0.0
        self.count = 0
        self.fmt = fmt

    def update(self, value, n=1):
        if isinstance(value, torch.Tensor):
            value = value.detach()
        self.window.append(value)
        self.total = self.total + value * n  # stays a device tensor when value is one
        self.count += n

    @property
    def median(self) -> float:
        values = sorted(_to_float(v) for v in self.window)
        return values[len(values) // 2] if values else float("nan")

    @property
    def global_avg(self) -> float:
        return _to_float(self.total) / max(self.count, 1)

    def synchronize_between_processes(self):
        """Sum totals and counts over ranks, so ``global_avg`` is the mean over all processes."""
        if not distributed.is_dist():
            return
        t = torch.tensor([_to_float(self.total), self.count], dtype=torch.float64,
                         device=distributed.collective_device())
        distributed.all_reduce_sum_(t)
        self.total, self.count = t[0].item(), int(t[1].item())

    def __str__(self):
        return self.fmt.format(median=self.median, global_avg=self.global_avg)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters: dict[str, Meter] = {}
        self.delimiter = delimiter

    def update(self, n=1, **values):
        for name, value in values.items():
            if value is None:
                continue
            if name not in self.meters:
                self.meters[name] = Meter(fmt="{median:.6f}") if name == "lr" else Meter()
            self.meters[name].update(value, n)

    def __getattr__(self, name):
        meters = self.__dict__.get("meters", {})
        if name in meters:
            return meters[name]
        raise AttributeError(name)

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        for meter in self.meters.values():
            meter.synchronize_between_processes()

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable, print_freq, header="", start=0, total=None):
        """Yield ``(step, item)`` from ``iterable`` and print progress with an ETA every ``print_freq`` steps.

        The time per iteration is kept in ``self.iter_time`` (seconds) for callers that log throughput.
        """
        total = len(iterable) + start if total is None else total
        width = len(str(total))
        start_time = end = time.time()
        iter_time, data_time = Meter(fmt="{global_avg:.4f}"), Meter(fmt="{global_avg:.4f}")
        self.iter_time = iter_time
        for step, item in enumerate(iterable, start):
            data_time.update(time.time() - end)
            yield step, item
            iter_time.update(time.time() - end)
            if step % print_freq == 0 or step == total - 1:
                eta = datetime.timedelta(seconds=int(iter_time.global_avg * (total - 1 - step)))
                memory = ""
                if torch.cuda.is_available() and torch.cuda.is_initialized():
                    memory = f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                print(f"{header} [{step:>{width}}/{total}]  eta: {eta}  {self}  "
                      f"time: {iter_time}  data: {data_time}{memory}", flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"{header} Total time: {elapsed} ({(time.time() - start_time) / max(total - start, 1):.4f} s / it)")


def write_log_line(output_dir, stats: dict, log_writer=None) -> None:
    """Append the epoch's ``stats`` as one JSON line to ``output_dir/log.txt`` (rank 0 only); the test metrics also
    go to TensorBoard (``perf/test_*``), whose writer is flushed."""
    if log_writer is not None:
        for key in ("test_acc1", "test_acc5", "test_loss"):
            if key in stats:
                log_writer.add_scalar(f"perf/{key}", stats[key], stats["epoch"])
        log_writer.flush()
    if not output_dir or not distributed.is_main_process():
        return
    with open(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
        f.write(json.dumps(stats) + "\n")


def final_test_accuracy(log_path) -> float:
    """``test_acc1`` of the last epoch in a program's ``log.txt``: the last epoch, not the best (choosing the
    epoch on the test set would flatter the result)."""
    accuracy = None
    with open(log_path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                accuracy = json.loads(line).get("test_acc1", accuracy)
    if accuracy is None:
        raise UserError(f"{log_path}: no test accuracy logged")
    return float(accuracy)


def tensorboard_writer(log_dir):
    """A SummaryWriter on rank 0, None elsewhere or when ``log_dir`` is empty."""
    if not log_dir or not distributed.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

    os.makedirs(log_dir, exist_ok=True)
    return SummaryWriter(log_dir=log_dir)
