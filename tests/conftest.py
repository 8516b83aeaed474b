"""Shared helpers: run a program as a user would (subprocess) or in-process, on tiny generated data."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))  # tests/fakedata.py


def run_program(*argv, timeout=300, env=None):
    """Run ``python argv...`` from the repository root; returns the CompletedProcess (text)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, *map(str, argv)], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)


def tiny_pretrain_argv(data_path, output_dir, *extra):
    """A short real pretraining command line: ViT-Tiny with 4-px patches on 32-px images, 2 epochs."""
    return ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--data_path", str(data_path),
            "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--num_workers", "0",
            "--output_dir", str(output_dir), "--log_dir", str(output_dir), "--print_freq", "1", *map(str, extra)]


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    from fakedata import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=8, size=32)
