"""Progress lines, the per-epoch log.txt and TensorBoard scalars. Meters keep tensors on their device and read
them back only to print, so logging does not synchronise the host with the GPU every iteration."""
import datetime
import json
import os
import statistics
import time
from collections import deque

import torch

from util import distributed
from util.errors import UserError


class Meter:
    """A running mean over the epoch and the median of the last ``window`` values."""

    def __init__(self, window=20, fmt="{median:.4f} ({global_avg:.4f})"):
        self.window = deque(maxlen=window)
        self.total, self.count, self.fmt = 0.0, 0, fmt

    def update(self, value, n=1):
        value = value.detach() if isinstance(value, torch.Tensor) else value
        self.window.append(value)
        self.total = self.total + value * n  # stays a device tensor when value is one
        self.count += n

    @property
    def median(self) -> float:
        return statistics.median_high(float(v) for v in self.window) if self.window else float("nan")

    @property
    def global_avg(self) -> float:
        return float(self.total) / max(self.count, 1)

    def __str__(self):
        return self.fmt.format(median=self.median, global_avg=self.global_avg)


class MetricLogger:
    def __init__(self, delimiter="  "):
        self.meters, self.delimiter = {}, delimiter

    def update(self, n=1, **values):
        for name, value in values.items():
            if value is not None:
                self.meters.setdefault(name, Meter(fmt="{median:.6f}") if name == "lr" else Meter()).update(value, n)

    def __getattr__(self, name):
        if name in self.__dict__.get("meters", {}):
            return self.meters[name]
        raise AttributeError(name)

    def __str__(self):
        return self.delimiter.join(f"{name}: {meter}" for name, meter in self.meters.items())

    def synchronize_between_processes(self):
        if distributed.is_dist():  # else each global_avg is already the mean over all processes
            t = torch.tensor([[float(m.total), m.count] for m in self.meters.values()], dtype=torch.double,
                             device=distributed.collective_device())
            distributed.all_reduce_sum_(t)
            for meter, (total, count) in zip(self.meters.values(), t.tolist()):
                meter.total, meter.count = total, int(count)

    def averages(self) -> dict:
        return {name: meter.global_avg for name, meter in self.meters.items()}

    def log_every(self, iterable, print_freq, header="", start=0, total=None):
        """Yield ``(step, item)``, printing progress every ``print_freq`` steps; ``self.iter_time``: s / step."""
        total = len(iterable) + start if total is None else total
        start_time = end = time.time()
        self.iter_time, data_time = Meter(fmt="{global_avg:.4f}"), Meter(fmt="{global_avg:.4f}")
        for step, item in enumerate(iterable, start):
            data_time.update(time.time() - end)
            yield step, item
            self.iter_time.update(time.time() - end)
            if step % print_freq == 0 or step == total - 1:
                eta = datetime.timedelta(seconds=int(self.iter_time.global_avg * (total - 1 - step)))
                memory = (f"  max mem: {torch.cuda.max_memory_allocated() / 2**20:.0f} MB"
                          if torch.cuda.is_initialized() else "")
                print(f"{header} [{step:>{len(str(total))}}/{total}]  eta: {eta}  {self}  "
                      f"time: {self.iter_time}  data: {data_time}{memory}", flush=True)
            end = time.time()
        elapsed = datetime.timedelta(seconds=int(time.time() - start_time))
        print(f"{header} Total time: {elapsed} ({(time.time() - start_time) / max(total - start, 1):.4f} s / it)")


def write_log_line(output_dir, epoch, train_stats, test_stats=None, log_writer=None, **extra) -> None:
    """Append the epoch's ``train_*``/``test_*`` means and ``extra`` as one JSON line to ``output_dir/log.txt``
    (rank 0); the test metrics also go to TensorBoard as ``perf/test_*``."""
    stats = {**{f"train_{k}": v for k, v in train_stats.items()},
             **{f"test_{k}": v for k, v in (test_stats or {}).items()}, "epoch": epoch, **extra}
    if log_writer is not None:
        for key, value in (test_stats or {}).items():
            log_writer.add_scalar(f"perf/test_{key}", value, epoch)
        log_writer.flush()
    if output_dir and distributed.is_main_process():
        with open(os.path.join(output_dir, "log.txt"), mode="a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")


def drop_log_lines_from(output_dir, epoch: int) -> None:
    """Remove the ``log.txt`` lines of epochs >= ``epoch``, which a resumed run is about to train (and log) again."""
    path = os.path.join(output_dir, "log.txt")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        lines = [line for line in f if line.strip()]
    kept = [line for line in lines if _logged_epoch(line) < epoch]
    if len(kept) < len(lines):
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _logged_epoch(line: str) -> float:
    try:
        return json.loads(line).get("epoch", -1)
    except ValueError:
        return float("inf")  # a line cut short by a kill


def final_test_accuracy(log_path) -> float:
    """``test_acc1`` of the last epoch in ``log.txt``, not the best one (choosing on the test set would flatter)."""
    with open(log_path, encoding="utf-8") as f:
        logged = [a for a in (json.loads(line).get("test_acc1") for line in f if line.strip()) if a is not None]
    if not logged:
        raise UserError(f"{log_path}: no test accuracy logged")
    return float(logged[-1])


def tensorboard_writer(log_dir):
    if not log_dir or not distributed.is_main_process():
        return None
    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import; it makes log_dir
    return SummaryWriter(log_dir=log_dir)
