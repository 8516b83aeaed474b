"""What every benchmark script records and how it writes its report."""
from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    """Date, CPU, core count, Python and the load average: what a figure needs next to it."""
    env = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "cpu": cpu_model(),
           "cpu_count": os.cpu_count(), "python": platform.python_version()}
    if hasattr(os, "getloadavg"):  # other processes on the machine change the numbers; say so
        env["load_average_1min"] = os.getloadavg()[0]
    return env


def write_json(report: dict, path) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=1)
