"""Running a program on SLURM through submitit: the one launcher behind submitit_pretrain.py,
submitit_finetune.py and submitit_linprobe.py.

The command line is the program's own (every flag of ``main_*.py``) plus the SLURM flags added here. Every
task of the job runs the program's ``main(args)`` with ``output_dir = log_dir = JOB_DIR`` and ``auto_resume``
on; ``util.distributed`` sets up the process group from the SLURM environment (rendezvous on the job's first
node, no shared file).

Preemption and time limits: SLURM sends USR2 shortly before the time limit (``--signal=USR2@120``) and on
preemption; submitit's handler on rank 0 calls ``Trainer.checkpoint`` and requeues the job. Nothing is saved
then: ``JOB_DIR/checkpoint-last.pth`` is written atomically every epoch (and every ``--save_every_iters``
iterations), and every start of the job -- first run, requeue after the signal, or a plain
``scontrol requeue`` where no handler ran -- resumes from it. At most the work since that file is lost.
"""
from __future__ import annotations

import copy
import importlib
import os
import shlex
import signal
import sys
from pathlib import Path

from util.cli import run
from util.errors import UserError, one_line

REPO = Path(__file__).resolve().parents[1]

# the original's per-GPU memory request; CPU jobs get the site's default unless --mem_gb says otherwise
MEM_GB_PER_GPU = 40

# program flags that mean something else in a job: their --help text there
HELP_IN_JOB = {
    "output_dir": "not accepted here: checkpoints and log.txt go to --job_dir",
    "log_dir": "not accepted here: TensorBoard logs go to --job_dir",
    "device": "cuda or cpu (default: cuda with --ngpus N, cpu with --ngpus 0)",
    "resume": "start the first run from this checkpoint; every later run resumes from JOB_DIR/checkpoint-last.pth",
    "auto_resume": "always on: every run of the job resumes from JOB_DIR/checkpoint-last.pth when it exists",
}


def add_slurm_args(parser) -> None:
    g = parser.add_argument_group("SLURM (submitit)")
    g.add_argument("--nodes", default=1, type=int, help="nodes to request")
    g.add_argument("--ngpus", default=8, type=int,
                   help="GPUs per node, one process each; 0 runs on CPU (--device cpu)")
    g.add_argument("--tasks_per_node", default=None, type=int,
                   help="processes per node (default: --ngpus, or 1 with --ngpus 0)")
    g.add_argument("--cpus_per_task", default=None, type=int,
                   help="CPUs per process (default: --num_workers + 1, the loader's workers and the training process)")
    g.add_argument("--mem_gb", default=None, type=float,
                   help=f"memory per node in GB (default: {MEM_GB_PER_GPU} per GPU; the site's default on CPU)")
    g.add_argument("--timeout", default=4320, type=int, metavar="MINUTES",
                   help="time limit of one run; the job requeues itself when it is reached (at most 3 times)")
    g.add_argument("--partition", default=None, help="partition (default: the cluster's default)")
    g.add_argument("--account", default=None)
    g.add_argument("--qos", default=None)
    g.add_argument("--constraint", default=None, help="node features, e.g. volta32gb")
    g.add_argument("--use_volta32", action="store_true", help="same as --constraint volta32gb (the original's flag)")
    g.add_argument("--exclude", default=None, help="nodes not to run on")
    g.add_argument("--comment", default=None, help="comment attached to the job")
    g.add_argument("--job_dir", default="jobs/%j",
                   help="checkpoints, log.txt, TensorBoard and SLURM logs (%%j: the job id; relative to the current "
                        "directory). Submitting again with an existing job dir continues the run saved there")
    g.add_argument("--dry_run", action="store_true", help="print the sbatch script instead of submitting it")
    # the submitting host usually has no GPU: the device follows --ngpus unless given
    parser.set_defaults(device=None, output_dir=None, log_dir=None)
    # --help must describe these program flags as they behave in a job, not as in a direct run
    for action in parser._actions:
        action.help = HELP_IN_JOB.get(action.dest, action.help)


def build_parser(program: str):
    """The program's own parser (``main_*.get_args_parser()``) with the SLURM flags added."""
    parser = importlib.import_module(program).get_args_parser()
    parser.description = f"{parser.prog} on SLURM (submitit): the flags of {program}.py, then the SLURM ones"
    parser.prog = f"submitit_{program.removeprefix('main_')}.py"
    add_slurm_args(parser)
    return parser


def resolve_args(args) -> None:
    """Check the SLURM flags and fill in what depends on them (device, tasks, CPUs, memory)."""
    for flag in ("nodes", "timeout"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.ngpus < 0:
        raise UserError(f"--ngpus must be 0 (CPU) or more, got {args.ngpus}")
    for flag in ("output_dir", "log_dir"):
        if getattr(args, flag) is not None:
            raise UserError(f"--{flag} is not used under SLURM: everything goes to --job_dir")
    if args.device is None:
        args.device = "cuda" if args.ngpus else "cpu"
    elif args.ngpus == 0 and str(args.device).startswith("cuda"):
        raise UserError("--ngpus 0 runs on CPU: drop --device cuda, or ask for GPUs with --ngpus N")
    if args.tasks_per_node is None:
        args.tasks_per_node = args.ngpus or 1
    if args.tasks_per_node < 1:
        raise UserError(f"--tasks_per_node must be at least 1, got {args.tasks_per_node}")
    if args.ngpus and str(args.device).startswith("cuda") and args.tasks_per_node > args.ngpus:
        raise UserError(f"--tasks_per_node {args.tasks_per_node} > --ngpus {args.ngpus}: each process needs its own GPU")
    if args.cpus_per_task is None:
        args.cpus_per_task = args.num_workers + 1
    if args.use_volta32:
        args.constraint = ",".join(filter(None, [args.constraint, "volta32gb"]))
    if args.mem_gb is None and args.ngpus:
        args.mem_gb = MEM_GB_PER_GPU * args.ngpus
    # sbatch and the job may run elsewhere: the job dir must not depend on their working directory
    args.job_dir = os.path.abspath(os.path.expanduser(args.job_dir))
    args.output_dir = args.log_dir = args.job_dir  # '%j' is resolved in the job (Trainer)
    args.auto_resume = True


def slurm_parameters(program: str, args) -> dict:
    """sbatch parameters, by the names of submitit's SlurmExecutor."""
    params = dict(
        job_name=f"mae_{program.removeprefix('main_')}",
        time=args.timeout,
        nodes=args.nodes,
        ntasks_per_node=args.tasks_per_node,
        cpus_per_task=args.cpus_per_task,
        gpus_per_node=args.ngpus or None,
        mem=_mem(args.mem_gb),
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        exclude=args.exclude,
        comment=args.comment,
        # USR2 two minutes before the time limit: time to finish the requeue
        signal_delay_s=120,
        # the job unpickles util.launcher.Trainer and imports main_*: the repository must be importable
        # whatever the working directory
        setup=[f"export PYTHONPATH={shlex.quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}"],
    )
    return {k: v for k, v in params.items() if v is not None}


def _mem(mem_gb):
    if mem_gb is None:
        return None
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def make_executor(args):
    import submitit

    class OfflineSlurmExecutor(submitit.SlurmExecutor):
        # renders the sbatch script where SLURM is not installed (--dry_run)
        @classmethod
        def affinity(cls):
            return 1

    executor_class = OfflineSlurmExecutor if args.dry_run else submitit.SlurmExecutor
    try:
        # python=None: the job runs this very interpreter (sys.executable), so the same virtual environment
        return executor_class(folder=args.job_dir, python=None)
    except RuntimeError as e:
        raise UserError(f"{e} (submit from a SLURM login node; --dry_run prints the job script anywhere)") from None


def submit(program: str, args):
    """Submit ``program.main(args)`` (or print its sbatch script with --dry_run); returns the submitit job."""
    resolve_args(args)
    executor = make_executor(args)
    executor.update_parameters(**slurm_parameters(program, args))
    if args.dry_run:
        # the exact text submitit would hand to sbatch
        print(executor._make_submission_file_text(executor._submitit_command_str, "dry_run"), end="")
        print(f"dry run: nothing submitted; the job would run {program}.main with output in {args.job_dir}",
              file=sys.stderr)
        return None
    from submitit.core.utils import FailedJobError

    try:
        job = executor.submit(Trainer(program, args))
    except FailedJobError as e:
        raise UserError(f"sbatch refused the job: {_last_line(e)}") from None
    paths = job.paths
    print(f"submitted job {job.job_id}: {program}, {args.nodes} node(s) x {args.tasks_per_node} task(s), "
          f"{f'{args.ngpus} GPU(s) per node' if args.ngpus else 'CPU'}")
    print(f"job dir (checkpoints, log.txt): {paths.folder}")
    print(f"stdout: {paths.stdout}")
    print(f"stderr: {paths.stderr}")
    if job.num_tasks > 1:
        print(f"(one pair of logs per task: {job.job_id}_<task>_log.out/.err; rank 0 prints the training log)")
    return job


def _last_line(error: Exception) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return (errors or lines or [type(error).__name__])[-1]


class Trainer:
    """The pickled job: ``program.main(args)`` in one SLURM task, requeueable by submitit."""

    def __init__(self, program: str, args):
        self.program = program
        self.args = args

    def __call__(self):
        import submitit

        job_env = submitit.JobEnvironment()
        # main() edits its args (lr, start_epoch, rank, ...); every run starts from the submitted ones
        args = copy.deepcopy(self.args)
        args.output_dir = args.log_dir = str(job_env.paths.folder)  # %j resolved
        args.auto_resume = True
        last = Path(args.output_dir) / "checkpoint-last.pth"
        if args.resume and last.is_file() and not getattr(args, "eval", False):
            # --resume only seeds the first run; a requeued one continues from its own checkpoint
            args.resume = ""
        _ignore_in_forked_children(_preempt_signal())
        stop_signals = _note_stop_signals()
        _threads_from_slurm()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
        print(f"job {job_env.job_id}, task {job_env.global_rank} of {job_env.num_tasks} on {job_env.hostname}, "
              f"run {restarts + 1}" + (f" (requeued; resuming from {last})" if restarts and last.is_file() else ""),
              flush=True)
        module = importlib.import_module(self.program)
        try:
            module.main(args)
        except Exception as e:
            if stop_signals and job_env.global_rank != 0:
                # rank 0 exits after requeueing (or SLURM kills the tasks one by one): this task's collective then
                # fails. A consequence, not an error: leave no error record or traceback behind
                _say(f"task {job_env.global_rank}: stopped by SLURM ({stop_signals[0]} received; {_first_line(e)}); "
                     f"a requeued job resumes from {last}")
                os._exit(1)
            _say(f"error: {type(e).__name__}: {_first_line(e)}")  # one readable line before submitit's traceback
            raise
        return args.output_dir

    def checkpoint(self):
        """Called by submitit on rank 0 when USR2 arrives: the job to requeue. The training state is already
        on disk (checkpoint-last.pth), which the rerun resumes from; saving here, inside a signal handler and
        while other ranks may sit in a collective, would not be safe."""
        import submitit

        return submitit.helpers.DelayedSubmission(type(self)(self.program, self.args))


def _say(line: str) -> None:
    # not print(): util.distributed silences it on ranks other than 0
    sys.stderr.write(line + "\n")
    sys.stderr.flush()
    sys.stdout.flush()


def _first_line(error: Exception) -> str:
    # util.cli's message, which also unwraps a DataLoader worker's traceback; a log line needs only its start
    lines = one_line(error).splitlines()
    return lines[0][:300] if lines else type(error).__name__


def _note_stop_signals() -> list:
    """Record the signals by which SLURM stops a job (USR2: preemption or time limit; TERM: requeue, cancel)
    ahead of submitit's handlers, which keep doing their work. Returns the list that fills up."""
    received = []
    for signum in (_preempt_signal(), signal.SIGTERM):
        handler = signal.getsignal(signum)
        if not callable(handler):  # not under submitit: leave default behaviour alone
            continue

        def note(num, frame, handler=handler):
            received.append(signal.Signals(num).name)
            handler(num, frame)

        signal.signal(signum, note)
    return received


def _preempt_signal():
    from submitit.core.job_environment import JobEnvironment

    return getattr(signal, "SIG" + JobEnvironment.USR_SIG)


_FORK_HOOKED = False


def _ignore_in_forked_children(signum) -> None:
    """SLURM signals every process of the job step, DataLoader workers included; a forked worker inherits
    submitit's handler and would checkpoint and requeue too (or die, without it). Only the training process
    must handle it."""
    global _FORK_HOOKED
    if not _FORK_HOOKED:
        os.register_at_fork(after_in_child=lambda: signal.signal(signum, signal.SIG_IGN))
        _FORK_HOOKED = True


def _threads_from_slurm() -> None:
    """One intra-op thread per allocated CPU: without cgroups every task sees all cores of the node, and
    several tasks each starting one thread per core oversubscribe it."""
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and "OMP_NUM_THREADS" not in os.environ:
        import torch

        torch.set_num_threads(max(1, int(cpus)))


def launch(program: str, argv=None) -> None:
    """Entry point of submitit_<program>.py: parse, submit, report; user errors as one line."""
    args = build_parser(program).parse_args(argv)
    run(lambda a: submit(program, a), args)
