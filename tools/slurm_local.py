"""A real single-node SLURM cluster on this machine, for the launch tests (tests/test_faults.py)
and benchmarks/faults.py: Debian's slurm-wlm + munge, started by hand without systemd
(../shared/notes/slurm_local.md has how it was found and measured).

    python tools/slurm_local.py start [--dir DIR]     start (or find running) and print SLURM_CONF
    python tools/slurm_local.py stop [--dir DIR]      stop the daemons this tool started
    python tools/slurm_local.py status [--dir DIR]

Everything lives in DIR (default /var/tmp/mt4ssl-slurm): the config (`slurm.conf`, used through
`SLURM_CONF`, so /etc/slurm is left alone), state, spool, logs and pid files. The daemons
listen on their own ports (6917/6918), so they do not meet a real cluster's. Two partitions
on this machine's cores: `debug` (the default) and `urgent`, whose jobs preempt debug's as a
busy cluster does (PreemptMode=REQUEUE: SIGTERM, SIGKILL 5 s later, the job requeued);
finished jobs stay visible to `scontrol show job` for 10 minutes (there is no accounting
database, so `sacct` does not answer here).

In Python, `with running() as cluster:` holds the cluster for a block (the tests' session):
it starts what is not running, sets SLURM_CONF, and the last block using it stops what such
blocks started (daemons started by `start` on the command line are left running).

Needs root (slurmd starts jobs as their user) and the Debian packages slurm-wlm and munge
(`make sysdeps` installs them when root). `why_not()` says why a cluster cannot start here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DIR = Path("/var/tmp/mt4ssl-slurm")
CTLD_PORT, SLURMD_PORT = 6917, 6918
PARTITION = "debug"  # the default partition: its jobs are preempted (requeued) by jobs of URGENT
URGENT = "urgent"
GRACE_S = 5  # a preempted job gets SIGTERM, then SIGKILL this many seconds later (GraceTime)
MUNGE_KEY = Path("/etc/munge/munge.key")
DAEMONS = ("slurmctld", "slurmd")

CONF = """\
# written by tools/slurm_local.py: a single-node cluster for mt4ssl's tests
ClusterName=mt4ssl-local
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation={dir}/state
SlurmdSpoolDir={dir}/spool
SlurmctldPidFile={dir}/slurmctld.pid
SlurmdPidFile={dir}/slurmd.pid
SlurmctldLogFile={dir}/slurmctld.log
SlurmdLogFile={dir}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MpiDefault=none
JobRequeue=1
MinJobAge=600
KillWait=10
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName={partition} Nodes={host} Default=YES MaxTime=INFINITE State=UP PriorityTier=1 GraceTime={grace}
PartitionName={urgent} Nodes={host} MaxTime=INFINITE State=UP PriorityTier=2 PreemptMode=OFF
"""


class Unavailable(RuntimeError):
    """No cluster can be started here; the message says why."""


@dataclass
class Cluster:
    folder: Path
    started: tuple[str, ...]  # the daemons this process started (and stop() stops)

    @property
    def conf(self) -> Path:
        return self.folder / "slurm.conf"

    def env(self) -> dict[str, str]:
        """The environment variables SLURM's commands need to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}


def why_not() -> str | None:
    """Why no cluster can start here (None: it can)."""
    if not sys.platform.startswith("linux"):
        return "needs Linux"
    missing = [p for p in ("/usr/sbin/slurmctld", "/usr/sbin/slurmd", "/usr/sbin/munged") if not Path(p).exists()]
    missing += [c for c in ("sbatch", "scontrol", "squeue", "scancel", "srun", "munge", "unmunge") if not shutil.which(c)]
    if missing:
        return (f"SLURM/munge not installed (missing {', '.join(missing)}): `make sysdeps` installs "
                f"slurm-wlm and munge when run as root")
    if os.geteuid() != 0:
        return "a local SLURM cluster needs root (slurmd runs jobs as their user); run the tests as root"
    return None


def _run(cmd: list[str], env: dict | None = None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def _munge_ok() -> bool:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        cred = subprocess.run(["munge", "-n"], capture_output=True, timeout=10)
        if cred.returncode == 0:
            return subprocess.run(["unmunge"], input=cred.stdout, capture_output=True, timeout=10).returncode == 0
    return False


def _start_munge() -> bool:
    """Start munged (as the munge user) unless one answers; True when it was started here."""
    if _munge_ok():
        return False
    import pwd

    user = pwd.getpwnam("munge")
    for folder in ("/etc/munge", "/run/munge", "/var/lib/munge", "/var/log/munge"):
        Path(folder).mkdir(parents=True, exist_ok=True)
        os.chown(folder, user.pw_uid, user.pw_gid)
    os.chmod("/etc/munge", 0o700)
    if not MUNGE_KEY.exists():
        MUNGE_KEY.write_bytes(os.urandom(1024))
    os.chown(MUNGE_KEY, user.pw_uid, user.pw_gid)
    os.chmod(MUNGE_KEY, 0o400)
    proc = _run(["su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged"])
    if proc.returncode != 0 or not _wait(_munge_ok, 10):
        raise Unavailable(f"munged did not start: {proc.stderr.strip() or proc.stdout.strip()}")
    return True


def _wait(predicate, timeout: float) -> bool:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if predicate():
            return True
        time.sleep(0.2)
    return False


def _pid(folder: Path, daemon: str) -> int | None:
    """The pid of `daemon` from its pid file in `folder`, if that process runs."""
    try:
        pid = int((folder / f"{daemon}.pid").read_text().split()[0])
        os.kill(pid, 0)
        return pid
    except (OSError, ValueError, IndexError):
        return None


def _node_idle(cluster: Cluster) -> bool:
    out = _run(["sinfo", "-h", "-N", "-o", "%t"], cluster.env())  # a line per partition
    states = set(out.stdout.split())
    return out.returncode == 0 and bool(states) and states <= {"idle", "mix", "alloc"}


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024 * 3 // 4  # what slurmd may hand out
    return 1024


def start(folder: Path = DEFAULT_DIR, timeout: float = 60) -> Cluster:
    """Start the cluster in `folder` (or find it running); raise Unavailable saying why not."""
    reason = why_not()
    if reason:
        raise Unavailable(reason)
    folder = Path(folder)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    started = ["munged"] if _start_munge() else []
    host = socket.gethostname().split(".")[0]
    conf = CONF.format(host=host, dir=folder, ctld_port=CTLD_PORT, slurmd_port=SLURMD_PORT,
                       cpus=os.cpu_count() or 1, mem_mb=_mem_mb(), partition=PARTITION, urgent=URGENT,
                       grace=GRACE_S)
    cluster = Cluster(folder, ())
    running = [d for d in DAEMONS if _pid(folder, d)]
    if running and cluster.conf.is_file() and cluster.conf.read_text() != conf:
        raise Unavailable(f"{folder}: {', '.join(running)} run with another config; stop them first "
                          f"(python tools/slurm_local.py stop --dir {folder})")
    cluster.conf.write_text(conf)
    env = {**os.environ, **cluster.env()}
    for daemon, args in (("slurmctld", ["-c"]), ("slurmd", [])):  # -c: no jobs left from an earlier start
        if _pid(folder, daemon):
            continue
        proc = subprocess.run([f"/usr/sbin/{daemon}", *args], env=env, capture_output=True, text=True, timeout=30)
        if proc.returncode != 0 or not _wait(lambda: _pid(folder, daemon), 10):
            log = folder / f"{daemon}.log"
            tail = log.read_text().splitlines()[-5:] if log.exists() else []
            raise Unavailable(f"{daemon} did not start (exit {proc.returncode}): "
                              f"{(proc.stderr.strip() or ' | '.join(tail))[-500:]}")
        started.append(daemon)
    cluster.started = tuple(started)
    if not _wait(lambda: _node_idle(cluster), timeout):
        state = _run(["sinfo", "-N", "-l"], cluster.env())
        raise Unavailable(f"the node did not become idle in {timeout:.0f} s: {state.stdout or state.stderr}")
    return cluster


SESSION_FILE = "started_by_blocks"  # the daemons `running()` blocks started: the last block stops them


@contextlib.contextmanager
def running(folder: Path = DEFAULT_DIR):
    """The cluster for the duration of the block (see the module doc); raises Unavailable."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / SESSION_FILE
    with open(folder / "users.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            cluster = start(folder)
        except BaseException:
            fcntl.flock(lock, fcntl.LOCK_UN)
            raise
        if cluster.started:
            before = record.read_text().split() if record.exists() else []
            record.write_text(" ".join(dict.fromkeys([*before, *cluster.started])) + "\n")
        fcntl.flock(lock, fcntl.LOCK_SH)  # other blocks may use it meanwhile
        saved = os.environ.get("SLURM_CONF")
        os.environ.update(cluster.env())
        try:
            yield cluster
        finally:
            if saved is None:
                os.environ.pop("SLURM_CONF", None)
            else:
                os.environ["SLURM_CONF"] = saved
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # only the last user gets it
            except BlockingIOError:
                pass
            else:
                if record.exists():
                    stop(Cluster(folder, tuple(record.read_text().split())))
                    record.unlink()


def stop(cluster: Cluster) -> None:
    """Stop the daemons `cluster` started (by their pid files), slurmd first."""
    for daemon in ("slurmd", "slurmctld"):
        if daemon not in cluster.started:
            continue
        pid = _pid(cluster.folder, daemon)
        if pid:
            os.kill(pid, signal.SIGTERM)
            _wait(lambda: _pid(cluster.folder, daemon) is None, 20)
    if "munged" in cluster.started:
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(Path("/run/munge/munged.pid").read_text().split()[0]), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("action", choices=("start", "stop", "status"))
    p.add_argument("--dir", type=Path, default=DEFAULT_DIR, help=f"the cluster's folder ({DEFAULT_DIR})")
    args = p.parse_args(argv)
    if args.action == "start":
        try:
            cluster = start(args.dir)
        except Unavailable as e:
            print(f"slurm_local: {e}", file=sys.stderr)
            return 1
        (args.dir / SESSION_FILE).unlink(missing_ok=True)  # started or kept by hand: stopped by hand
        print(f"export SLURM_CONF={cluster.conf}")
        return 0
    if args.action == "stop":
        record = args.dir / SESSION_FILE
        munged = ("munged",) if record.exists() and "munged" in record.read_text().split() else ()
        stop(Cluster(args.dir, DAEMONS + munged))
        record.unlink(missing_ok=True)
        return 0
    pids = {d: _pid(args.dir, d) for d in DAEMONS}
    print(" ".join(f"{d}={'pid ' + str(p) if p else 'stopped'}" for d, p in pids.items()))
    return 0 if all(pids.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
