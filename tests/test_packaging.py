"""The package installs as pip builds it (not only editable): models, helpers and programs import outside a
checkout."""
import os
import shutil
import subprocess
import sys

from conftest import REPO

PROGRAMS = ["main_pretrain", "main_finetune", "main_linprobe", "visualize"]


def test_non_editable_install_has_models_util_and_programs(tmp_path):
    # build from a copy of the sources: setuptools keeps a build/ directory whose stale files would end up in
    # the wheel, and a test must not write into the checkout
    source = tmp_path / "source"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".*", "build", "*.egg-info", "__pycache__", "runs", "jobs", "demo_output", "output_dir", "*.pth"))
    target = tmp_path / "site"
    build = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                            "--target", str(target), str(source)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    env = {**os.environ, "PYTHONPATH": str(target)}
    # the checkout is importable too (editable install in the test venv): every module must come from target
    modules = ["models_mae", "models_vit", "engine", "util.checkpoint", *PROGRAMS, "submitit_pretrain"]
    probe = (f"import importlib, timm; mods = [importlib.import_module(m) for m in {modules!r}]; "
             f"outside = [m.__name__ for m in mods if not m.__file__.startswith({str(target)!r})]; "
             "assert not outside, f'not installed: {outside}'; "
             "print(len(timm.create_model('mae_vit_base_patch16').state_dict()))")
    result = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["254"]
    for program in PROGRAMS:
        usage = subprocess.run([sys.executable, "-m", program, "--help"], cwd=tmp_path, env=env,
                               capture_output=True, text=True, timeout=300)
        assert usage.returncode == 0 and "usage:" in usage.stdout, (program, usage.stderr[-2000:])
