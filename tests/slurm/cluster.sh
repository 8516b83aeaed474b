#!/usr/bin/env bash
# Bring up / tear down a real SLURM cluster on this host for the integration tests (tests that need it skip when
# it cannot start): one node in the host's network, or (MAE_SLURM_NODES=N, N >= 2) N nodes, each in a network
# namespace of its own. The two kinds are independent clusters (own directory, ports, munged) and can be up at
# the same time.
#
# Prerequisites (Debian 12, as root -- exactly what CI runs):
#   apt-get update && apt-get install -y slurm-wlm munge iproute2
# `start` installs slurm-wlm and munge itself with those same commands when `slurmctld` is missing and we are
# root (set MAE_SLURM_NO_INSTALL=1 to forbid that).
#
# Usage (MAE_SLURM_NODES=N in front of each for the N-node cluster):
#   tests/slurm/cluster.sh start    # idempotent; waits until every node is idle
#   tests/slurm/cluster.sh stop     # kills only the daemons (and, N nodes, the processes in the namespaces)
#                                   # this script started; removes its network namespaces and links
#   tests/slurm/cluster.sh status   # exit 0 when up (prints sinfo), 1 when down
#   tests/slurm/cluster.sh env      # eval "$(tests/slurm/cluster.sh env)"
#   tests/slurm/cluster.sh exec NODE CMD...   # N nodes: run CMD on NODE (its network, its name resolution)
#
# Everything lives in ${MAE_SLURM_DIR:-/tmp/mae-slurm}, with N nodes /tmp/mae-slurm-nodes (the munge user must
# be able to traverse its parents, so not under /root):
#   slurm.conf     clients need SLURM_CONF=$MAE_SLURM_DIR/slurm.conf
#   bin/sacct      sacct shim for submitit (see write_sacct_shim); clients put
#                  $MAE_SLURM_DIR/bin first on PATH
#   munge/         private munged: own key, socket and pid file (a system munged,
#                  if any, is left alone; slurm finds ours via AuthInfo=socket=),
#                  shared by all nodes (a unix socket crosses network namespaces)
#   state/ spool/  slurmctld StateSaveLocation / slurmd SlurmdSpoolDir (one per node)
#   log/           slurmctld.log slurmd-NODE.log munged.log jobcomp.log
#   run/           slurmctld/slurmd pid files
#   hosts          N nodes: the nodes' names and addresses, then this host's /etc/hosts
#
# N nodes: node0..node(N-1), node K in the network namespace mae-nodeK at $MAE_SLURM_SUBNET.(10+K) (default
# subnet 10.251.17), on a veth pair (mae0 inside) joined by the bridge mae-br0, which holds the controller's address
# $MAE_SLURM_SUBNET.1. There is no route out: traffic stays between the host and these namespaces. Each node's
# slurmd (and so every job step on it) and `exec` see the file `hosts` as /etc/hosts (a private mount namespace),
# so node names resolve on every node; the host's /etc/hosts is not touched. The nodes keep this host's hostname,
# which resolves to no address of the node (a loopback one, as Debian's 127.0.1.1, or the host's), so gloo's
# default address (its hostname's) is of no use across nodes. One N-node cluster at a time.
#
# Knobs: MAE_SLURM_NODES (default 1), MAE_SLURM_DIR, MAE_SLURM_CTLD_PORT (default 16817, N nodes 16827),
#        MAE_SLURM_SLURMD_PORT (default 16818, N nodes 16828), MAE_SLURM_SUBNET,
#        MAE_SLURM_START_TIMEOUT (s, default 60).
#
# Behaviour worth knowing when writing tests against this cluster (all checked
# on Debian 12, slurm 22.05.8, submitit 1.5):
#  * `scontrol requeue <id>` (what submitit does on USR2) makes the job PENDING
#    (Reason=BeginTime) with EligibleTime = now + 121 s, hard-coded in
#    slurmctld. Release it at once: `scontrol update JobId=<id> StartTime=now`.
#    The rerun sees SLURM_RESTART_COUNT=1, 2, ... (unset on the first run).
#  * `scancel --signal=USR2 <id>` signals every process of every job step (the
#    srun-launched tasks AND their children) but not the batch shell. `--batch`
#    signals only the batch shell, `--full` both; a batch shell without a trap
#    (submitit's) dies of it and the job ends FAILED -- never use those two to
#    "preempt" a submitit job.
#  * submitit treats USR2 as a *timeout* (not a preemption) whenever
#    timeout_min <= 10 (its threshold is min(0.8*T, T-10min)); each timeout
#    uses up one of slurm_max_num_timeout (3) requeues.
#  * No slurmdbd: plain sacct fails; the shim in bin/ answers from the
#    jobcomp log instead, so submitit's job.state / failure detection work.
#  * Start the node daemons with `nsenter --net` (the network namespace only):
#    `ip netns exec` also remounts /sys, and slurmd then stops on a missing
#    /sys/fs/cgroup.
set -euo pipefail

log() { echo "cluster.sh: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

NODES="${MAE_SLURM_NODES:-1}"
[[ "$NODES" =~ ^[1-9][0-9]?$ ]] || die "MAE_SLURM_NODES must be a number of nodes from 1 to 99, got '$NODES'"
START_TIMEOUT="${MAE_SLURM_START_TIMEOUT:-60}"
BRIDGE=mae-br0
NETNS_PREFIX=mae-       # node K's network namespace and host-side veth: mae-nodeK
NODE_IFNAME=mae0        # its interface, inside the namespace
if ((NODES == 1)); then
    D="${MAE_SLURM_DIR:-/tmp/mae-slurm}"
    CTLD_PORT="${MAE_SLURM_CTLD_PORT:-16817}"
    SLURMD_PORT="${MAE_SLURM_SLURMD_PORT:-16818}"
    NODE_NAMES=("$(hostname -s)")
    CTLD_ADDR=127.0.0.1
    NODE_ADDRS=(127.0.0.1)
else
    D="${MAE_SLURM_DIR:-/tmp/mae-slurm-nodes}"
    CTLD_PORT="${MAE_SLURM_CTLD_PORT:-16827}"
    SLURMD_PORT="${MAE_SLURM_SLURMD_PORT:-16828}"
    SUBNET="${MAE_SLURM_SUBNET:-10.251.17}"
    CTLD_ADDR="$SUBNET.1"
    NODE_NAMES=() NODE_ADDRS=()
    for ((k = 0; k < NODES; k++)); do
        NODE_NAMES+=("node$k")
        NODE_ADDRS+=("$SUBNET.$((10 + k))")
    done
fi
CONF="$D/slurm.conf"
MUNGE_SOCKET="$D/munge/munge.socket.2"

# Is this pid a running process? Zombies count as dead: the daemons get
# reparented to PID 1, which in some containers never reaps them.
pid_alive() {
    local state
    [[ -n "$1" && -r "/proc/$1/stat" ]] || return 1
    state="$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1)" || return 1
    [[ -n "$state" && "$state" != Z && "$state" != X ]]
}

# pid from a pid file, only if that process is still alive.
live_pid() {
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc 0-9 <"$1")"
    pid_alive "$pid" && echo "$pid"
}

daemons_up() {
    local node
    live_pid "$D/munge/munged.pid" >/dev/null && live_pid "$D/run/slurmctld.pid" >/dev/null || return 1
    for node in "${NODE_NAMES[@]}"; do
        live_pid "$D/run/slurmd-$node.pid" >/dev/null || return 1
    done
}

# The state of every node, one per line ("idle", "down*", ...).
node_states() {
    SLURM_CONF="$CONF" sinfo --noheader -N -o '%T' 2>/dev/null || true
}

# Every one of our nodes is up and can take jobs.
nodes_ready() {
    local states
    states="$(node_states)"
    [[ "$(grep -cxE 'idle|mixed|allocated|completing' <<<"$states")" == "$NODES" ]]
}

ensure_packages() {
    command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
    [[ "$(id -u)" == 0 && -z "${MAE_SLURM_NO_INSTALL:-}" ]] ||
        die "slurm/munge missing; run: apt-get update && apt-get install -y slurm-wlm munge"
    log "installing slurm-wlm and munge"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >/dev/null && apt-get install -y slurm-wlm munge >/dev/null
}

write_conf() {
    # Node hardware as slurmd itself sees it, so slurmctld never drains the node
    # for "Low socket*core*thread count". RealMemory is trimmed by 5% so the node
    # is not drained for "Low RealMemory" either.
    local hw cpus mem layout
    hw="$(slurmd -C 2>/dev/null | head -n1)"
    cpus="$(nproc)"
    mem="$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.95)}' /proc/meminfo)"
    layout=""
    if [[ "$hw" =~ (Boards=[0-9]+\ SocketsPerBoard=[0-9]+\ CoresPerSocket=[0-9]+\ ThreadsPerCore=[0-9]+) ]]; then
        layout="${BASH_REMATCH[1]}"
        [[ "$hw" =~ CPUs=([0-9]+) ]] && cpus="${BASH_REMATCH[1]}"
    fi
    cat >"$CONF" <<EOF
# Generated by tests/slurm/cluster.sh -- $NODES-node test cluster.
ClusterName=mae-test
SlurmctldHost=$(hostname -s)($CTLD_ADDR)
SlurmUser=root
SlurmdUser=root
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCKET
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
# No cgroups: works in containers / gVisor.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.log
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Requeue-friendly: jobs may be requeued, a node that went DOWN comes back.
JobRequeue=1
ReturnToService=2
# Fast turnaround for tests. MinJobAge keeps finished jobs visible to
# squeue/scontrol for 60 s (there is no sacct without a slurmdbd).
KillWait=2
MinJobAge=60
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
SchedulerParameters=sched_interval=2

EOF
    local k
    for k in "${!NODE_NAMES[@]}"; do
        echo "NodeName=${NODE_NAMES[k]} NodeAddr=${NODE_ADDRS[k]} NodeHostname=${NODE_NAMES[k]} CPUs=$cpus $layout" \
            "RealMemory=$mem State=UNKNOWN" >>"$CONF"
    done
    local IFS=,
    echo "PartitionName=debug Nodes=${NODE_NAMES[*]} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO" >>"$CONF"
}

# submitit polls job state with `sacct -o JobID,State,NodeList --parsable2 -j ID`,
# which needs a slurmdbd. Without one, `sacct --completion` reads the
# jobcomp/filetxt log instead (finished and requeued jobs; running ones are
# simply absent, which submitit treats as "not done"). Clients that put
# $MAE_SLURM_DIR/bin first on PATH (see `env`) get that transparently.
write_sacct_shim() {
    local real
    real="$(type -ap sacct | grep -v "^$D/bin/" | head -n1)" || true
    [[ -n "$real" ]] || real=/usr/bin/sacct
    mkdir -p "$D/bin"
    cat >"$D/bin/sacct" <<EOF
#!/bin/sh
# Generated by tests/slurm/cluster.sh: sacct without slurmdbd (see there).
exec "$real" --completion "\$@"
EOF
    chmod 0755 "$D/bin/sacct"
}

start_munged() {
    live_pid "$D/munge/munged.pid" >/dev/null && return 0
    # Private key and socket. munged refuses to run as root and insists its
    # key is owned by its own user with no group/other access.
    if [[ ! -s "$D/munge/munge.key" ]]; then
        dd if=/dev/urandom of="$D/munge/munge.key" bs=1024 count=1 status=none
    fi
    chown -R munge:munge "$D/munge"
    chmod 0755 "$D/munge" # clients (slurm, any user) must reach the socket
    chmod 0400 "$D/munge/munge.key"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    touch "$D/log/munged.log"
    chown munge:munge "$D/log/munged.log"
    runuser -u munge -- munged \
        --socket="$MUNGE_SOCKET" \
        --key-file="$D/munge/munge.key" \
        --pid-file="$D/munge/munged.pid" \
        --log-file="$D/log/munged.log" \
        --seed-file="$D/munge/munged.seed" ||
        { tail -n 20 "$D/log/munged.log" >&2; die "munged failed to start"; }
    for _ in $(seq 50); do
        munge -n --socket="$MUNGE_SOCKET" | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    tail -n 20 "$D/log/munged.log" >&2
    die "munged is not answering on $MUNGE_SOCKET"
}

show_logs() {
    local f
    for f in "$D"/log/{munged,slurmctld,slurmd-*}.log; do
        [[ -f "$f" ]] || continue
        echo "----- tail of $f -----" >&2
        tail -n 30 "$f" >&2
    done
}

# ---------------------------------------------------------------- N nodes: the network
# Run "$@" on node $1: in its network namespace, and in a private mount namespace that sees $D/hosts as
# /etc/hosts. Every step execs the next, so the caller's pid is the command's.
in_node() {
    local node="$1"
    shift
    [[ -e "/run/netns/$NETNS_PREFIX$node" ]] || die "no node '$node' (nodes: ${NODE_NAMES[*]}; is the cluster up?)"
    exec nsenter --net="/run/netns/$NETNS_PREFIX$node" \
        unshare --mount sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$D/hosts" "$@"
}

net_up() {
    local k ns
    {
        echo "# Generated by tests/slurm/cluster.sh: the nodes, then the host's /etc/hosts."
        for k in "${!NODE_NAMES[@]}"; do
            echo "${NODE_ADDRS[k]} ${NODE_NAMES[k]}"
        done
        cat /etc/hosts
    } >"$D/hosts"
    # (called where `set -e` does not act: every step is checked)
    ip link add "$BRIDGE" type bridge && ip addr add "$CTLD_ADDR/24" dev "$BRIDGE" && ip link set "$BRIDGE" up ||
        return 1
    for k in "${!NODE_NAMES[@]}"; do
        ns="$NETNS_PREFIX${NODE_NAMES[k]}"
        ip netns add "$ns" &&
            ip link add "$ns" type veth peer name "$NODE_IFNAME" netns "$ns" &&
            ip link set "$ns" master "$BRIDGE" up &&
            ip -n "$ns" addr add "${NODE_ADDRS[k]}/24" dev "$NODE_IFNAME" &&
            ip -n "$ns" link set "$NODE_IFNAME" up &&
            ip -n "$ns" link set lo up || return 1
    done
}

# Every namespace and link of an N-node cluster, whatever its N; first the processes left in the namespaces
# (job steps, `exec` commands), by pid.
net_down() {
    local ns pids
    command -v ip >/dev/null || return 0
    for ns in $(ip netns list | awk '{print $1}' | grep -E "^${NETNS_PREFIX}node[0-9]+$"); do
        pids="$(ip netns pids "$ns" 2>/dev/null | tr '\n' ' ')"
        if [[ -n "${pids// /}" ]]; then
            log "killing what still runs on ${ns#"$NETNS_PREFIX"}: pids $pids"
            # shellcheck disable=SC2086
            kill -KILL $pids 2>/dev/null || true
        fi
        ip link del "$ns" 2>/dev/null || true
        ip netns del "$ns"
    done
    if ip link show "$BRIDGE" >/dev/null 2>&1; then
        ip link del "$BRIDGE"
    fi
}

net_is_up() {
    local node
    ip link show "$BRIDGE" >/dev/null 2>&1 || return 1
    for node in "${NODE_NAMES[@]}"; do
        [[ -e "/run/netns/$NETNS_PREFIX$node" ]] || return 1
    done
}

# ---------------------------------------------------------------- commands
cluster_up() {
    daemons_up && nodes_ready && { ((NODES == 1)) || net_is_up; }
}

cmd_start() {
    if cluster_up; then
        echo "slurm test cluster already up ($CONF)"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "must run as root (slurmd launches jobs as their user)"
    ensure_packages
    ((NODES == 1)) || command -v ip >/dev/null || die "iproute2 missing; run: apt-get install -y iproute2"
    # A half-up cluster (e.g. a daemon died): restart everything cleanly.
    cmd_stop >/dev/null 2>&1 || true

    mkdir -p "$D"/{munge,state,spool,log,run}
    chmod 0755 "$D"
    ((NODES == 1)) || net_up || { net_down; die "could not create the nodes' network namespaces and links (ip)"; }
    write_conf
    write_sacct_shim
    start_munged

    # -c: start from an empty job state (no jobs left over from an earlier run);
    # old job-completion records go too, so the sacct shim cannot report them.
    if [[ -f "$D/log/jobcomp.log" ]]; then
        mv -f "$D/log/jobcomp.log" "$D/log/jobcomp.log.old"
    fi
    slurmctld -c -f "$CONF" || { show_logs; die "slurmctld failed to start"; }
    local node
    for node in "${NODE_NAMES[@]}"; do
        if ((NODES == 1)); then
            slurmd -f "$CONF" -N "$node"
        else
            (in_node "$node" slurmd -f "$CONF" -N "$node")
        fi || { show_logs; die "slurmd of $node failed to start"; }
    done

    # Wait for every slurmd to register: "idle" (a trailing * would mean "not
    # responding", so match exactly).
    local deadline=$((SECONDS + START_TIMEOUT)) ready=""
    while ((SECONDS < deadline)); do
        if nodes_ready; then
            ready=1 && break
        fi
        # e.g. a stale "DOWN" from an earlier run: ReturnToService=2
        # normally clears it, but do it explicitly.
        for node in "${NODE_NAMES[@]}"; do
            if [[ "$(SLURM_CONF="$CONF" sinfo --noheader -n "$node" -o '%T' 2>/dev/null)" =~ ^(down|drain|fail) ]]; then
                SLURM_CONF="$CONF" scontrol update NodeName="$node" State=RESUME >/dev/null 2>&1 || true
            fi
        done
        sleep 0.5
    done
    if [[ -z "$ready" ]]; then
        SLURM_CONF="$CONF" sinfo -N -l >&2 || true
        SLURM_CONF="$CONF" scontrol show nodes >&2 || true
        show_logs
        die "not every node is idle after ${START_TIMEOUT}s (states: $(node_states | tr '\n' ' '))"
    fi
    # "idle" is not enough: right after startup slurmctld does not schedule for
    # a few seconds (jobs submitted then sit PENDING). Run one real job step on
    # every node, which also proves munge credentials and slurmstepd work end to end.
    if ! SLURM_CONF="$CONF" timeout "$START_TIMEOUT" \
        srun --quiet --job-name=mae-probe --nodes="$NODES" --ntasks-per-node=1 --time=1 true; then
        show_logs
        die "probe job 'srun true' failed or hung"
    fi
    local IFS=,
    echo "slurm test cluster up: node(s) ${NODE_NAMES[*]}, partition debug ($CONF)"
}

# Stop a daemon by its pid file, SIGTERM first, SIGKILL after 10 s.
stop_pid() {
    local name="$1" pidfile="$2" pid
    pid="$(live_pid "$pidfile")" || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 100); do
        pid_alive "$pid" || return 0
        sleep 0.1
    done
    log "$name (pid $pid) did not exit on SIGTERM; killing it"
    kill -KILL "$pid" 2>/dev/null || true
}

cmd_stop() {
    # Cancel jobs first so slurmstepd/tasks do not linger after slurmd stops.
    if live_pid "$D/run/slurmctld.pid" >/dev/null; then
        SLURM_CONF="$CONF" scancel --full --quiet --signal=KILL --state=RUNNING \
            --partition=debug >/dev/null 2>&1 || true
        SLURM_CONF="$CONF" scancel --quiet --partition=debug >/dev/null 2>&1 || true
        sleep 0.5
    fi
    local pidfile
    for pidfile in "$D"/run/slurmd-*.pid "$D/run/slurmd.pid"; do
        stop_pid slurmd "$pidfile"
    done
    stop_pid slurmctld "$D/run/slurmctld.pid"
    stop_pid munged "$D/munge/munged.pid"
    rm -f "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
    ((NODES == 1)) || net_down
    echo "slurm test cluster stopped (logs kept in $D)"
}

cmd_status() {
    if cluster_up; then
        SLURM_CONF="$CONF" sinfo
        return 0
    fi
    echo "slurm test cluster is down"
    return 1
}

cmd_env() {
    # Client commands only need the conf (it names the munge socket itself);
    # PATH adds the sacct shim that submitit's job-state polling relies on.
    echo "export SLURM_CONF=$CONF"
    echo "export PATH=\"$D/bin:\$PATH\""
}

case "${1:-}" in
start) cmd_start ;;
stop) cmd_stop ;;
status) cmd_status ;;
env) cmd_env ;;
exec)
    ((NODES > 1 && $# >= 3)) || die "usage: MAE_SLURM_NODES=N $0 exec NODE CMD..."
    in_node "${@:2}"
    ;;
*)
    echo "usage: $0 start|stop|status|env|exec NODE CMD..." >&2
    exit 2
    ;;
esac
