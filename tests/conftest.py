"""Shared helpers: run a program as a user would (subprocess) or in-process, on tiny generated data."""
import json
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


def run_in_process(module, argv):
    """``module.main`` (a program) on the command line ``argv``, in this process; returns its parsed arguments."""
    args = module.get_args_parser().parse_args([str(a) for a in argv])
    module.main(args)
    return args


def log_lines(output_dir):
    """The JSON lines of a run's ``log.txt``."""
    return [json.loads(line) for line in (Path(output_dir) / "log.txt").read_text().splitlines()]


def tiny_pretrain_argv(data_path, output_dir, *extra):
    """A short real pretraining command line: ViT-Tiny with 4-px patches on 32-px images, 2 epochs."""
    return ["--model", "mae_vit_tiny_patch4", "--input_size", "32", "--data_path", str(data_path),
            "--epochs", "2", "--batch_size", "8", "--device", "cpu", "--amp", "none", "--num_workers", "0",
            "--output_dir", str(output_dir), "--log_dir", str(output_dir), "--print_freq", "1", *map(str, extra)]


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory):
    from fakedata import make_imagefolder

    return make_imagefolder(tmp_path_factory.mktemp("data"), num_classes=2, per_class=8, size=32)


# ------------------------------------------------------------------ helpers for end-to-end promises
# Subprocess runs (a program, torchrun) get this many seconds: generous, because a shared 2-core machine can be many
# times slower than an idle one; a run that hangs still ends. MAE_TEST_SUBPROCESS_TIMEOUT overrides it.
SUBPROCESS_TIMEOUT = float(os.environ.get("MAE_TEST_SUBPROCESS_TIMEOUT", 1800))


class StopProgram(Exception):
    """Raised by a spy to end an in-process program run once it has shown what it built."""


def stop_at_training(monkeypatch, module):
    """Replace ``module.train_one_epoch`` by a spy that records what the program built (``model``, ``optimizer``,
    ``args`` and the keyword arguments, e.g. ``criterion``) and stops the run with ``StopProgram``."""
    seen = {}

    def spy(model, data_loader, optimizer, device, epoch, updater, args, **kwargs):
        seen.update(model=model, data_loader=data_loader, optimizer=optimizer, args=args, **kwargs)
        raise StopProgram

    monkeypatch.setattr(module, "train_one_epoch", spy)
    return seen


def watch_training(monkeypatch, module, on_first_call=None):
    """Wrap ``module.train_one_epoch`` so that it still trains, after keeping a copy of the trained module's state
    as training starts (``seen['initial']``) and the arguments of every call (``seen['calls']``);
    ``on_first_call(seen)`` may install more spies (it gets ``model``, ``optimizer`` and ``kwargs`` in ``seen``)."""
    from engine import unwrap

    real = module.train_one_epoch
    seen = {"calls": []}

    def spy(model, data_loader, optimizer, device, epoch, updater, args, **kwargs):
        if not seen["calls"]:
            seen["initial"] = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}
            seen.update(model=model, optimizer=optimizer, args=args, kwargs=kwargs)
            if on_first_call is not None:
                on_first_call(seen)
        seen["calls"].append(dict(epoch=epoch, **kwargs))
        kwargs = {**kwargs, **seen.get("replace_kwargs", {})}
        return real(model, data_loader, optimizer, device, epoch, updater, args, **kwargs)

    monkeypatch.setattr(module, "train_one_epoch", spy)
    return seen
