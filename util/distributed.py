"""One distributed code path: one process, torchrun (one or more nodes) or SLURM tasks. torchrun sets RANK,
WORLD_SIZE and LOCAL_RANK; SLURM tasks (srun, submitit) have SLURM_PROCID, SLURM_NTASKS and SLURM_LOCALID and meet
on the job's first node at a port derived from the job id (no shared file); otherwise one process, no process group.
nccl on CUDA, gloo on CPU; gloo binds to the interface that reaches the rendezvous host unless GLOO_SOCKET_IFNAME says
otherwise. Only rank 0 prints (``print(..., force=True)``: any rank)."""
from __future__ import annotations

import builtins
import datetime
import ipaddress
import os
import re
import socket

import torch
import torch.distributed as dist
from submitit.slurm.slurm import SlurmJobEnvironment


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def slurm_master_addr() -> str:
    """The job's first node (``SLURM_JOB_NODELIST`` such as ``gpu[003-005,9]-ib,cpu1`` -> ``gpu003-ib``)."""
    return SlurmJobEnvironment().hostnames[0]  # submitit parses SLURM's compressed node lists


def route_interface(host: str | None) -> str | None:
    """The network interface of this machine's route to ``host`` (Linux's IPv4 routes); None for a loopback address
    or without a route."""
    try:
        address = ipaddress.IPv4Address(socket.gethostbyname(host)) if host else None
        with open("/proc/net/route") as f:  # Iface Destination Gateway Flags RefCnt Use Metric Mask ... (hex)
            routes = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    if address is None or address.is_loopback:
        return None
    address = int.from_bytes(address.packed, "little")  # as the table writes addresses
    matches = [(int(r[7], 16).bit_count(), r[0]) for r in routes if address & int(r[7], 16) == int(r[1], 16)]
    return max(matches)[1] if matches else None  # the longest prefix


def init_distributed_mode(args) -> None:
    """Set ``args.rank``, ``world_size``, ``gpu`` (local rank) and ``distributed``; start a process group if several."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:  # torchrun
        args.rank, args.world_size, args.gpu = int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        args.rank, args.world_size = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        args.gpu = int(env.get("SLURM_LOCALID", 0))
        env.setdefault("MASTER_ADDR", slurm_master_addr())
        # the same on every task of a job, different for jobs sharing a node
        env.setdefault("MASTER_PORT", str(20000 + int(re.sub(r"\D", "", env.get("SLURM_JOB_ID", "")) or 0) % 20000))
    else:
        args.rank, args.world_size, args.gpu = 0, 1, 0
    args.distributed = args.world_size > 1 or getattr(args, "fsdp", False)  # FSDP needs a group, even of one
    if not args.distributed:
        return
    use_cuda = str(args.device).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(args.gpu)
    backend = "nccl" if use_cuda else "gloo"
    interface = None
    if backend == "gloo":
        # gloo's default address is the one this host's name resolves to, on many nodes a loopback address (Debian:
        # 127.0.1.1) that the other nodes cannot reach: the interface that reaches the rendezvous host instead
        interface = env.get("GLOO_SOCKET_IFNAME") or route_interface(env.get("MASTER_ADDR"))
        if interface:
            env["GLOO_SOCKET_IFNAME"] = interface
    print(f"| distributed init (rank {args.rank}/{args.world_size}, {backend}): {args.dist_url}"
          + (f", GLOO_SOCKET_IFNAME={interface}" if interface else ""), flush=True)
    timeout, store = datetime.timedelta(minutes=30), None
    if args.world_size == 1:  # --fsdp in one process: a group of one, no rendezvous
        store = dist.HashStore()
    elif env.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        # torchrun's agent keeps its store across worker restarts, and env:// would hand restarted workers the
        # previous attempt's peer addresses (they then fail to connect): one key prefix per attempt
        store = dist.PrefixStore(f"attempt_{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", dist.TCPStore(
            env["MASTER_ADDR"], int(env["MASTER_PORT"]), args.world_size, is_master=False, timeout=timeout))
    dist.init_process_group(backend=backend, init_method=None if store else args.dist_url, store=store,
                            world_size=args.world_size, rank=args.rank, timeout=timeout,
                            device_id=torch.device("cuda", args.gpu) if use_cuda else None)
    dist.barrier()
    builtin_print, is_main = builtins.print, args.rank == 0

    def print_main(*print_args, force=False, **kwargs):
        if is_main or force:
            builtin_print(*print_args, **kwargs)

    builtins.print = print_main


def destroy() -> None:
    if is_dist():
        dist.destroy_process_group()


def barrier() -> None:
    if is_dist():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(tensor)
    return tensor


def all_gather_object(obj) -> list:
    if not is_dist():
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


def collective_device() -> torch.device:
    """Where tensors must live for a collective (nccl: this GPU; gloo: CPU)."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
