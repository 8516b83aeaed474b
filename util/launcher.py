"""The SLURM launcher (submitit) behind submitit_{pretrain,finetune,linprobe}.py: the program's flags plus SLURM's.

Every task runs ``main(args)`` with ``output_dir = log_dir = JOB_DIR`` and ``auto_resume`` on. On USR2 (preemption,
or near the time limit) rank 0 requeues the job, saving nothing: every start resumes from checkpoint-last.pth."""
from __future__ import annotations

import copy
import importlib
import os
import shlex
import signal
import sys
from pathlib import Path

import submitit
import torch
from submitit.core.utils import FailedJobError

from util.cli import run
from util.errors import UserError, one_line

REPO = Path(__file__).resolve().parents[1]
MEM_GB_PER_GPU = 40  # the original's request; CPU jobs get the site's default unless --mem_gb says otherwise
SIGNAL_DELAY_S = 120  # the preemption signal this long before the time limit: time to requeue
PREEMPT_SIGNAL = getattr(signal, "SIG" + submitit.JobEnvironment.USR_SIG)

IN_A_JOB = ("In a job, checkpoints, log.txt, TensorBoard and SLURM logs all go to --job_dir (--output_dir and "
            "--log_dir are not accepted); --device defaults to cuda with --ngpus N and to cpu with --ngpus 0; "
            "--auto_resume is always on: every run of the job, requeues included, resumes from "
            "JOB_DIR/checkpoint-last.pth when it exists, and --resume only seeds the first run.")


def build_parser(program: str):
    """The program's own parser (``main_*.get_args_parser()``) with the SLURM flags added."""
    parser = importlib.import_module(program).get_args_parser()
    parser.description = f"{parser.prog} on SLURM: the flags of {program}.py, then SLURM's (the end: how a job differs)"
    parser.prog = f"submitit_{program.removeprefix('main_')}.py"
    parser.epilog = " ".join(filter(None, [IN_A_JOB, parser.epilog]))
    g = parser.add_argument_group("SLURM (submitit)")
    g.add_argument("--nodes", default=1, type=int, help="nodes to request")
    g.add_argument("--ngpus", default=8, type=int, help="GPUs per node, one process each; 0 runs on CPU")
    g.add_argument("--tasks_per_node", default=None, type=int, help="processes per node (default: --ngpus, or 1)")
    g.add_argument("--cpus_per_task", default=None, type=int,
                   help="CPUs per process (default: --num_workers + 1, the loader's workers and the training process)")
    g.add_argument("--mem_gb", default=None, type=float,
                   help=f"memory per node in GB (default: {MEM_GB_PER_GPU} per GPU; the site's default on CPU)")
    g.add_argument("--timeout", default=4320, type=int, metavar="MINUTES",
                   help="time limit of one run; the job requeues itself when it is reached (at most 3 times)")
    for flag, text in (("--partition", "partition (default: the cluster's default)"), ("--account", None),
                       ("--qos", None), ("--constraint", "node features, e.g. volta32gb"),
                       ("--exclude", "nodes not to run on"), ("--comment", "comment attached to the job")):
        g.add_argument(flag, default=None, help=text)
    g.add_argument("--use_volta32", action="store_true", help="same as --constraint volta32gb (the original's flag)")
    g.add_argument("--job_dir", default="jobs/%j", help="checkpoints, log.txt, TensorBoard and SLURM logs (%%j: the "
                   "job id); submitting again with an existing job dir continues the run saved there")
    g.add_argument("--dry_run", action="store_true", help="print the job's sbatch parameters instead of submitting it")
    parser.set_defaults(device=None, output_dir=None, log_dir=None)  # device: from --ngpus, not from this host
    return parser


def resolve_args(args) -> None:
    """Check the SLURM flags and fill in what depends on them (device, tasks, CPUs, memory)."""
    if args.tasks_per_node is None:
        args.tasks_per_node = args.ngpus or 1
    for flag, least in (("nodes", 1), ("timeout", 1), ("ngpus", 0), ("tasks_per_node", 1)):
        if getattr(args, flag) < least:
            raise UserError(f"--{flag} must be at least {least}, got {getattr(args, flag)}")
    for flag in ("output_dir", "log_dir"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is not used under SLURM: everything goes to --job_dir")
    if args.device is None:
        args.device = "cuda" if args.ngpus else "cpu"
    elif args.ngpus == 0 and str(args.device).startswith("cuda"):
        raise UserError("--ngpus 0 runs on CPU: drop --device cuda, or ask for GPUs with --ngpus N")
    if args.ngpus and str(args.device).startswith("cuda") and args.tasks_per_node > args.ngpus:
        raise UserError(f"--tasks_per_node {args.tasks_per_node} > --ngpus {args.ngpus}: "
                        "each process needs its own GPU")
    if args.cpus_per_task is None:
        args.cpus_per_task = args.num_workers + 1
    if args.use_volta32:
        args.constraint = ",".join(filter(None, [args.constraint, "volta32gb"]))
    if args.mem_gb is None and args.ngpus:
        args.mem_gb = MEM_GB_PER_GPU * args.ngpus
    args.job_dir = os.path.abspath(os.path.expanduser(args.job_dir))  # sbatch and the job may run elsewhere
    args.output_dir = args.log_dir = args.job_dir  # '%j' is resolved in the job (Trainer)
    args.auto_resume = True


def submit(program: str, args):
    """Submit ``program.main(args)`` (or print its sbatch parameters with --dry_run); returns the submitit job."""
    resolve_args(args)
    mem = args.mem_gb
    params = dict(  # sbatch parameters, by the names of submitit's SlurmExecutor
        job_name=f"mae_{program.removeprefix('main_')}", time=args.timeout, nodes=args.nodes,
        ntasks_per_node=args.tasks_per_node, cpus_per_task=args.cpus_per_task, gpus_per_node=args.ngpus or None,
        mem=None if mem is None else f"{int(mem)}GB" if mem == int(mem) else f"{int(mem * 1024)}MB",
        partition=args.partition, account=args.account, qos=args.qos, constraint=args.constraint,
        exclude=args.exclude, comment=args.comment, signal_delay_s=SIGNAL_DELAY_S,
        # the job unpickles util.launcher.Trainer and imports main_*, whatever its working directory
        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    params = {k: v for k, v in params.items() if v is not None}
    if args.dry_run:  # submitit renders no sbatch script publicly: print its parameters, setup and command
        flags = {k: v for k, v in params.items() if k not in ("setup", "signal_delay_s")}
        flags["signal"] = f"{submitit.JobEnvironment.USR_SIG}@{SIGNAL_DELAY_S}"
        for key, value in sorted(flags.items()):
            print(f"#SBATCH --{key.replace('_', '-')}={shlex.quote(str(value))}")
        print(*params["setup"], sep="\n")
        print(f"# command (srun, every task): {sys.executable} running {program}.main(args), output in {args.job_dir}")
        print("dry run: nothing submitted; submitit adds --output/--error in the job dir", file=sys.stderr)
        return None
    try:
        executor = submitit.SlurmExecutor(folder=args.job_dir)  # runs the job with this interpreter, this venv
    except RuntimeError as e:  # no srun here
        raise UserError(f"{e} (submit from a SLURM login node; --dry_run works anywhere)") from None
    executor.update_parameters(**params)
    try:
        job = executor.submit(Trainer(program, args))
    except FailedJobError as e:
        errors = [line.strip() for line in str(e).splitlines() if "error" in line.lower()] or [one_line(e)]
        raise UserError(f"sbatch refused the job: {errors[-1]}") from None  # sbatch's own line, not submitit's trace
    where = f"{args.ngpus} GPU(s) per node" if args.ngpus else "CPU"
    print(f"submitted job {job.job_id}: {program}, {args.nodes} node(s) x {args.tasks_per_node} task(s), {where}")
    print(f"job dir (checkpoints, log.txt): {job.paths.folder}\nstdout: {job.paths.stdout}\nstderr: {job.paths.stderr}")
    if job.num_tasks > 1:
        print(f"(one pair of logs per task: {job.job_id}_<task>_log.out/.err; rank 0 prints the training log)")
    return job


class Trainer:
    """The pickled job: ``program.main(args)`` in one SLURM task, requeueable by submitit."""

    def __init__(self, program: str, args):
        self.program, self.args = program, args

    def __call__(self):
        job_env = submitit.JobEnvironment()
        args = copy.deepcopy(self.args)  # main() edits its args; every run starts from the submitted ones
        args.output_dir = args.log_dir = str(job_env.paths.folder)  # %j resolved
        last = Path(args.output_dir) / "checkpoint-last.pth"
        if args.resume and last.is_file() and not getattr(args, "eval", False):
            args.resume = ""  # --resume only seeds the first run; later ones continue from their own checkpoint
        # SLURM signals every process of the step: a forked DataLoader worker must not requeue the job too
        os.register_at_fork(after_in_child=lambda: signal.signal(PREEMPT_SIGNAL, signal.SIG_IGN))
        stop_signals = []  # those by which SLURM stops the job (USR2: preemption, time limit; TERM: requeue, cancel)
        for signum in (PREEMPT_SIGNAL, signal.SIGTERM):
            handler = signal.getsignal(signum)
            if callable(handler):  # not under submitit: leave the default behaviour alone
                def note(num, frame, handler=handler):
                    stop_signals.append(signal.Signals(num).name)
                    handler(num, frame)
                signal.signal(signum, note)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:  # without cgroups, each task would use every core
            torch.set_num_threads(max(1, int(cpus)))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        node = job_env.hostnames[job_env.node]  # as squeue names it, not necessarily its hostname
        print(f"job {job_env.job_id}, task {job_env.global_rank} of {job_env.num_tasks} on {node}, "
              f"run {restarts + 1}" + (f" (requeued; resuming from {last})" if restarts and last.is_file() else ""),
              flush=True)
        try:
            importlib.import_module(self.program).main(args)
        except Exception as e:
            if stop_signals and job_env.global_rank != 0:  # rank 0 exited to requeue, or SLURM killed the tasks
                _say(f"task {job_env.global_rank}: stopped by SLURM ({stop_signals[0]} received; "
                     f"{one_line(e)[:300]}); a requeued job resumes from {last}")
                os._exit(1)
            _say(f"error: {type(e).__name__}: {one_line(e)[:300]}")  # one readable line before submitit's traceback
            raise
        return args.output_dir

    def checkpoint(self):
        """submitit's requeue on USR2 (rank 0). checkpoint-last.pth is on disk: saving in a signal handler is unsafe."""
        return submitit.helpers.DelayedSubmission(type(self)(self.program, self.args))


def _say(line: str) -> None:
    sys.stdout.flush()  # not print(): util.distributed silences it on ranks other than 0; stderr is line-buffered
    sys.stderr.write(line + "\n")


def launch(program: str, argv=None) -> None:
    run(lambda args: submit(program, args), build_parser(program).parse_args(argv))
