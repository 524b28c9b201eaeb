"""A real Slurm cluster for tests: one slurmctld and two slurmd ("n1", "n2") on loopback, on
this one machine, with its own munged. Everything (conf, munge key and socket, state, spool
dirs, logs, pid files) lives in one folder the caller owns; every Slurm command finds the
cluster through SLURM_CONF in `SlurmCluster.env`, so other clusters on the machine (the
system's own, or another test run's) are never touched.

    cluster = start_cluster(tmp / "slurm")
    job = cluster.run("sbatch", "-N", "2", "--parsable", "--wrap", "srun hostname").stdout.strip()
    assert cluster.wait_job(job) == "COMPLETED"
    cluster.stop()

Needs root (slurmd runs jobs as their submitter and must be able to switch users) and Debian's
`slurmctld slurmd slurm-client munge` packages. Daemons are started in the foreground (`-D`,
`-F`) as children of this process, each in a session of its own (a Ctrl-C in the terminal
reaches only pytest, which then stops them in order), and die with this process if it dies
first (PR_SET_PDEATHSIG). They are stopped by pid, never by name.
"""

from __future__ import annotations

import ctypes
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

STARTUP_SECONDS = 60
STOP_GRACE_SECONDS = 5
# The daemons live in /usr/sbin, which a non-login root shell may not have on PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
_DAEMONS = ("munged", "slurmctld", "slurmd")
_CLIENTS = ("sbatch", "srun", "squeue", "sinfo", "scontrol", "scancel")
# States after which a job never runs again (a requeued job goes back to PENDING instead).
FINAL_STATES = frozenset({"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "BOOT_FAIL",
                          "DEADLINE", "OUT_OF_MEMORY", "SPECIAL_EXIT", "REVOKED"})
# Variables of an enclosing Slurm job (tests run inside an allocation) that would leak into
# sbatch/srun of this cluster and point them at a job it does not have.
_FOREIGN_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_", "SQUEUE_", "SINFO_", "SCONTROL_")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes with the NUL


def _which(name: str) -> str | None:
    return shutil.which(name, path=_SEARCH_PATH)


def slurm_available() -> str | None:
    """None when this machine can run the cluster, else why not."""
    if os.name != "posix" or not Path("/proc/self").exists():
        return "a Slurm test cluster needs Linux"
    if os.geteuid() != 0:
        return "a Slurm test cluster needs root (slurmd starts jobs as their user)"
    missing = [name for name in (*_DAEMONS, *_CLIENTS) if _which(name) is None]
    if missing:
        return (f"Slurm/munge binaries missing: {', '.join(missing)} "
                "(apt-get install slurmctld slurmd slurm-client munge)")
    return None


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM when the process that started it dies (a killed
    pytest leaves no daemons or servers behind; tests/prefect_server.py uses it too)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _free_ports(count: int) -> list[int]:
    """Ports free on every address right now (the daemons bind 0.0.0.0). Held together while
    choosing, so the same port is never handed out twice."""
    held = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("", 0))
            held.append(sock)
        return [sock.getsockname()[1] for sock in held]
    finally:
        for sock in held:
            sock.close()


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"  ({exc.strerror})"
    return "\n".join("  " + line for line in text[-lines:]) or "  (empty)"


class SlurmCommandError(subprocess.CalledProcessError):
    """`SlurmCluster.run(check=True)` failed; unlike its base class, says what the command printed."""

    def __str__(self) -> str:
        return f"{super().__str__()}\n{self.stdout or ''}{self.stderr or ''}".rstrip()


@dataclass
class _Daemon:
    name: str
    process: subprocess.Popen
    logs: tuple[Path, ...]


@dataclass
class SlurmCluster:
    root: Path  # the temporary folder: conf, munge, state, spool, logs, pid files
    env: dict[str, str]  # os.environ plus SLURM_CONF: for every subprocess that calls sbatch/squeue/scontrol
    nodes: list[str]  # ["n1", "n2"]
    _daemons: list[_Daemon] = field(default_factory=list, repr=False)

    @property
    def conf(self) -> Path:
        return Path(self.env["SLURM_CONF"])

    def run(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """A Slurm command (`sbatch`, `squeue`, ...) against this cluster, output captured as text.
        It runs in `root`, so a job submitted without --chdir/--output writes its slurm-N.out there."""
        command = [_which(args[0]) or args[0], *args[1:]]
        result = subprocess.run(command, env=self.env, cwd=self.root, capture_output=True, text=True,
                                timeout=timeout, stdin=subprocess.DEVNULL)
        if check and result.returncode != 0:
            raise SlurmCommandError(result.returncode, list(args), result.stdout, result.stderr)
        return result

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", str(job_id)).stdout
        match = re.search(r"\bJobState=(\S+)", out)
        if not match:
            raise RuntimeError(f"no JobState for job {job_id}: {out!r}")
        return match.group(1)

    def wait_job(self, job_id: str, timeout: float = 300) -> str:
        """Polls the job until it reaches a final state and returns it (COMPLETED, FAILED, ...)."""
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in FINAL_STATES:
                return state
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} still {state} after {timeout:.0f}s\n{self.diagnostics()}")

    def diagnostics(self) -> str:
        """The tails of every daemon's log, for error messages."""
        parts = []
        for daemon in self._daemons:
            code = daemon.process.poll()
            parts.append(f"--- {daemon.name} (pid {daemon.process.pid}, "
                         f"{'running' if code is None else f'exited with {code}'})")
            for log in daemon.logs:
                if log.exists():  # munged in the foreground logs to stderr (the .out file) only
                    parts.append(f"{log}:\n{_tail(log)}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancels what still runs, then stops slurmd, slurmctld and munged by pid (SIGTERM, SIGKILL
        after a few seconds), then anything left that was started under this cluster's SLURM_CONF
        (slurmstepd and job processes outlive slurmd by design). Safe to call twice."""
        if not self._daemons:
            return
        ctld = next((d for d in self._daemons if d.name == "slurmctld"), None)
        if ctld is not None and ctld.process.poll() is None:
            try:
                jobs = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10).stdout.split()
                if jobs:
                    self.run("scancel", *jobs, check=False, timeout=10)
                    deadline = time.monotonic() + STOP_GRACE_SECONDS
                    while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i", check=False,
                                                                    timeout=10).stdout.strip():
                        time.sleep(0.2)
            except (subprocess.SubprocessError, OSError):
                pass
        # Nodes first, then the controller, then munge (which both still talk to while stopping).
        for kind in ("slurmd", "slurmctld", "munged"):
            _terminate([d.process for d in self._daemons if d.name.split(" ")[0] == kind])
        self._daemons.clear()
        _terminate(_processes_with_env("SLURM_CONF", str(self.conf)))


def _terminate(processes) -> None:
    """SIGTERM, wait, SIGKILL. `processes` are Popen objects or pids."""
    popens = [p for p in processes if isinstance(p, subprocess.Popen)]
    pids = [p for p in processes if isinstance(p, int)]
    for proc in popens:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    for proc in popens:
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    while pids and time.monotonic() < deadline:
        pids = [pid for pid in pids if _alive(pid)]
        time.sleep(0.1)
    for pid in pids:
        _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _processes_with_env(key: str, value: str) -> list[int]:
    """Pids (not this process) whose environment has key=value: how the helper finds the
    slurmstepd and job processes of its own cluster and of no other."""
    wanted = f"{key}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if wanted in (entry / "environ").read_bytes().split(b"\0") and _alive(int(entry.name)):
                found.append(int(entry.name))
        except OSError:
            pass
    return found


def _hostname() -> str:
    """This machine's short name, as slurmctld and slurmd compare it (`vm` in the sandbox)."""
    return socket.gethostname().split(".")[0]


def _slurm_conf(root: Path, host: str, ctld_port: int, node_ports: list[int], socket_path: Path) -> str:
    names = [f"n{i + 1}" for i in range(len(node_ports))]
    node_lines = "\n".join(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs=1 State=UNKNOWN"
                           for name, port in zip(names, node_ports))
    return f"""\
# Written by tests/slurm_cluster.py: a throwaway cluster on loopback; everything under {root}.
ClusterName=tunepipe-test
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job waits this long before it may start again (default 120 s; docs/clusters.md)
AuthInfo=socket={socket_path},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/slurmd-%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={root}/plugstack.conf
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MpiDefault=none
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
InactiveLimit=0
{node_lines}
PartitionName=debug Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(root: Path, nodes: int = 2) -> SlurmCluster:
    """Starts munged, slurmctld and `nodes` slurmd under `root` and returns once every node is
    idle. Raises RuntimeError (with the daemons' log tails) if that takes over 60 s."""
    reason = slurm_available()
    if reason:
        raise RuntimeError(reason)
    root = Path(root).resolve()
    names = [f"n{i + 1}" for i in range(nodes)]
    for sub in ("munge", "state", "log", "run", *(f"spool/slurmd-{name}" for name in names)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_dir = root / "munge"
    socket_path = munge_dir / "munge.socket"
    if len(str(socket_path)) > _UNIX_PATH_MAX:
        raise RuntimeError(f"{socket_path} is too long for a unix socket; use a shorter root")
    key = munge_dir / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o600)
    (root / "plugstack.conf").write_text("")  # no site SPANK plugins from /etc/slurm

    host = _hostname()
    ctld_port, *node_ports = _free_ports(1 + nodes)
    conf = root / "slurm.conf"
    conf.write_text(_slurm_conf(root, host, ctld_port, node_ports, socket_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_PREFIXES)}
    env["SLURM_CONF"] = str(conf)
    cluster = SlurmCluster(root=root, env=env, nodes=names)

    def launch(name: str, command: list[str], log: Path) -> None:
        out = root / "log" / f"{name.replace(' ', '-')}.out"
        with out.open("wb") as stream:  # a file, not a pipe: nobody drains a pipe
            process = subprocess.Popen(command, env=env, cwd=root, stdin=subprocess.DEVNULL, stdout=stream,
                                       stderr=subprocess.STDOUT, start_new_session=True,
                                       preexec_fn=die_with_parent)
        cluster._daemons.append(_Daemon(name, process, (log, out)))

    def wait_for(what: str, ready, deadline: float) -> None:
        while time.monotonic() < deadline:
            dead = [d for d in cluster._daemons if d.process.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited with {dead[0].process.returncode} while waiting for "
                                   f"{what}\n{cluster.diagnostics()}")
            if ready():
                return
            time.sleep(0.2)
        raise RuntimeError(f"Slurm test cluster: no {what} within {STARTUP_SECONDS}s "
                           f"(conf {conf})\n{cluster.diagnostics()}")

    deadline = time.monotonic() + STARTUP_SECONDS
    try:
        # munged runs as root with --force: the cluster's folder sits under pytest's 0700 basetemp,
        # which the `munge` user cannot enter, and munged insists that every folder above its
        # socket be searchable by all. --force turns that check into a warning instead of
        # loosening pytest's folders; only root (all of this cluster) uses the socket.
        launch("munged", [_which("munged"), "--foreground", "--force", f"--socket={socket_path}",
                          f"--key-file={key}", f"--pid-file={munge_dir / 'munged.pid'}",
                          f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"],
               munge_dir / "munged.log")
        wait_for("munge socket", socket_path.exists, deadline)
        launch("slurmctld", [_which("slurmctld"), "-D", "-f", str(conf)], root / "log" / "slurmctld.log")
        wait_for("answer from slurmctld",
                 lambda: "UP" in cluster.run("scontrol", "ping", check=False, timeout=10).stdout, deadline)
        for name in cluster.nodes:
            launch(f"slurmd {name}", [_which("slurmd"), "-D", "-N", name, "-f", str(conf)],
                   root / "log" / f"slurmd-{name}.log")

        def all_idle() -> bool:
            out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10).stdout
            states = dict(line.split() for line in out.splitlines() if len(line.split()) == 2)
            return all(states.get(name) == "idle" for name in cluster.nodes)

        wait_for("idle nodes in sinfo", all_idle, deadline)
    except BaseException:
        cluster.stop()
        raise
    return cluster
