"""The output directory: created, held by one run at a time, never silently reused, cleared of a killed run's
temporary files."""
from __future__ import annotations

import fcntl
import os
import shutil
import socket
from pathlib import Path

from util import distributed
from util.errors import UserError

RUN_FILES = ("checkpoint-*.pth", "checkpoint-*.dcp", "log.txt", "log_steps.txt")  # what --overwrite deletes
_lock = None  # the open lock file of this process's run: flock is released when the process dies, never stale


def checkpoints(out: Path) -> list[Path]:
    """The run's checkpoints, newest first: ``checkpoint-last``, then ``checkpoint-EPOCH`` by epoch (``.pth`` files;
    ``.dcp`` directories under ``--fsdp``)."""
    found = [p for p in out.glob("checkpoint-*") if p.suffix in (".pth", ".dcp")]
    kept = [(int(p.stem.split("-")[1]), p) for p in found if p.stem.split("-")[1].isdigit()]
    return [p for p in found if p.stem == "checkpoint-last"] + [p for _, p in sorted(kept, reverse=True)]


def release() -> None:
    """Let the next run have the directory (a program's exit does the same; this is for runs inside one process)."""
    global _lock
    if _lock is not None:
        _lock.close()
        _lock = None


def claim(args) -> None:
    """Create ``--output_dir`` and lock it for this run (rank 0 checks; every rank raises the same error)."""
    if not args.output_dir:
        return
    problem = _claim_on_main(Path(args.output_dir), args) if distributed.is_main_process() else None
    problem = next((p for p in distributed.all_gather_object(problem) if p), None)
    if problem:
        raise UserError(problem)


def _claim_on_main(out: Path, args) -> str | None:
    global _lock
    try:
        out.mkdir(parents=True, exist_ok=True)
        release()  # an earlier run in this process that stopped on an error
        _lock = open(out / ".lock", "a+", encoding="utf-8")
    except OSError as e:
        return f"cannot use --output_dir {out}: {e.strerror or e}"
    try:
        fcntl.flock(_lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        _lock.seek(0)
        holder = _lock.read().strip() or "another process"
        _lock.close()
        _lock = None
        return f"--output_dir {out} is in use by {holder}; wait for it to end or choose another --output_dir"
    _lock.truncate(0)
    _lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    _lock.flush()
    for orphan in out.glob(".checkpoint-*.tmp"):  # left by a run killed while saving; the lock says it is over
        _remove(orphan)
    earlier = checkpoints(out)
    if getattr(args, "overwrite", False):
        previous = [path for pattern in RUN_FILES for path in out.glob(pattern)]
        for path in previous:
            _remove(path)
        if previous:
            print(f"--overwrite: deleted the earlier run's checkpoints and logs in {out}")
    elif earlier and not (args.auto_resume or args.resume):
        return (f"--output_dir {out} holds an earlier run ({earlier[0].name}); pass --auto_resume to continue it, "
                f"--overwrite to start afresh (its checkpoints and logs are deleted), or another --output_dir")
    return None


def _remove(path: Path) -> None:
    if path.is_dir():  # an --fsdp checkpoint
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
