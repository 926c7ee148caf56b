"""A three-node Ray cluster on this machine (a head and two workers) and drills on it, one after the other: a
job, and something lost mid-job. After a drill that lost a node, a new worker node takes its place, so every
drill starts on three nodes; one cluster for all of them spares its start-up per drill.

Run it inside a network namespace of its own, where loopback is the only interface:

    unshare -n sh -c 'ip link set lo up && exec python tests/cluster_drill.py drills.json results.json'

A multi-node Ray needs RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1, and with it Ray listens on every interface it
sees and advertises the machine's address whatever --node-ip-address says; in the namespace there is only
loopback to see. The drill still lists every listening socket (`ss -ltn`) before the job and goes no further
if one is not on loopback.

drills.json: {"drills": {NAME: {"job": job.yaml, "kill": "worker" | "infer" | "driver" | "none",
"after_files": 1, "timeout_s": 300}, ...}}. "worker" loses a worker node that does not host the GPU-stage
actor, "infer" the worker node that does, "driver" SIGKILLs the driver of a job submitted through the Jobs
API and submits the same job again.
results.json: {NAME: result}; a result holds the listeners, what was killed and when, the exit status, wall
time and the driver's output.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
LOOPBACK = re.compile(r"^(127\.0\.0\.1|\[::ffff:127\.0\.0\.1\]|\[::1\]|::1):\d+$")
# Either worker node alone holds every stage of a drill's job (pipeline.chain.cpus_beside_infer and the
# GPU-stage actor's two, test_node_loss.RESOURCES): a lost node's actors come back on the other whatever it
# already runs. With 3 CPUs a worker could not take a restarted GPU-stage actor beside the CPU actors that
# had landed on it, and the job waited out the no-progress bound.
HEAD_CPUS, WORKER_CPUS = 1, 6
# Fixed ports, below the ephemeral range where Ray and the kernel pick theirs: the namespace is ours alone,
# and a port found free and bound later can be taken in between.
GCS_PORT = 20000
CLIENT_PORT = 20001
DASHBOARD_PORT = 20002
# Each node's own ports and its workers' range: the head's, then one block per worker node ever started
# (a replacement gets a block of its own: the lost node's sockets may linger).
FIRST_NODE_PORT, NODE_PORT_BLOCK = 21000, 1000
PORT_FLAGS = (  # every port of a node its own: the three nodes share one address
    "--node-manager-port",
    "--object-manager-port",
    "--metrics-export-port",
    "--dashboard-agent-listen-port",
    "--dashboard-agent-grpc-port",
    "--runtime-env-agent-port",
)


class NodeDidNotStart(RuntimeError):
    """A node's `ray start` exited before the node joined."""


class Cluster:
    """The head and two worker nodes, each a `ray start --block` in a process group of its own."""

    def __init__(self, dashboard: bool = False):
        self.temp = tempfile.mkdtemp(prefix="vlb-drill-", dir="/tmp")  # short: socket paths are limited
        token = Path(self.temp) / "token"
        token.write_text(secrets.token_hex(32))
        self.env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        self.env.update(
            RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1",
            RAY_AUTH_MODE="token",
            RAY_AUTH_TOKEN_PATH=str(token),
            RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
            # The head declares a lost node dead after three missed health checks a second apart, not five
            # three seconds apart: the drills time the job's recovery, not Ray's wait before it starts.
            RAY_health_check_period_ms="1000",
            RAY_health_check_failure_threshold="3",
        )
        self.address = f"127.0.0.1:{GCS_PORT}"
        self.jobs_api = f"http://127.0.0.1:{DASHBOARD_PORT}" if dashboard else None
        self.nodes: dict[str, subprocess.Popen] = {}  # every node started, lost ones included
        self.lost: set[str] = set()

    @property
    def workers(self) -> list[str]:
        """The worker nodes alive, oldest first."""
        return [name for name in self.nodes if name != "head" and name not in self.lost]

    def start(self) -> None:
        head = ["--head", "--port", str(GCS_PORT), "--temp-dir", self.temp]
        head += ["--ray-client-server-port", str(CLIENT_PORT)]
        if self.jobs_api:
            head += ["--include-dashboard", "true", "--dashboard-host", "127.0.0.1"]
            head += ["--dashboard-port", str(DASHBOARD_PORT)]
        else:
            head += ["--include-dashboard", "false"]
        self._start("head", head, HEAD_CPUS)
        self._wait_nodes(1)
        self.add_workers()

    def add_workers(self) -> None:
        """Worker nodes until two are alive: after a loss, once the head has seen the lost node go."""
        self._wait_nodes(1 + len(self.workers))
        # One at a time: worker nodes started together share the head's session directory and their
        # raylets abort on "bind: Address already in use".
        for _ in range(4):
            if len(self.workers) >= 2:
                break
            name = f"w{len(self.nodes)}"
            self._start(name, ["--address", self.address], WORKER_CPUS)
            try:
                self._wait_nodes(1 + len(self.workers), starting=name)
            except NodeDidNotStart:
                # On a loaded machine a raylet can miss Ray's fixed 30 s to register: another node instead.
                self.lost.add(name)
        if len(self.workers) < 2:
            raise RuntimeError(f"worker nodes did not start:\n{self.logs()}")

    def _start(self, name: str, extra: list[str], cpus: int) -> None:
        base = FIRST_NODE_PORT + NODE_PORT_BLOCK * len(self.nodes)
        cmd = [
            str(BIN / "ray"),
            "start",
            "--block",
            "--node-ip-address",
            "127.0.0.1",
            "--disable-usage-stats",
        ]
        cmd += [*extra, "--num-cpus", str(cpus)]
        cmd += ["--min-worker-port", str(base + 100), "--max-worker-port", str(base + 999)]
        for i, flag in enumerate(PORT_FLAGS):
            cmd += [flag, str(base + i)]
        log = open(Path(self.temp) / f"{name}.log", "w")
        self.nodes[name] = subprocess.Popen(
            cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    def _wait_nodes(self, count: int, timeout_s: float = 180, starting: str | None = None) -> None:
        """Until exactly `count` nodes are alive: Ray Data sizes its budget from the nodes it sees when it
        starts, and a lost node counts until the head has noticed. NodeDidNotStart if `starting` exits."""
        probe = (
            "import ray; ray.init(address='auto', logging_level='ERROR'); "
            "print(sum(n['Alive'] for n in ray.nodes()))"
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = subprocess.run(
                [sys.executable, "-c", probe], env={**self.env, "RAY_ADDRESS": self.address},
                capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            if done.returncode == 0 and done.stdout.strip().splitlines()[-1:] == [str(count)]:
                return
            if starting is not None and self.nodes[starting].poll() is not None:
                raise NodeDidNotStart(starting)
            time.sleep(1)
        raise RuntimeError(f"the cluster did not reach {count} nodes:\n{self.logs()}")

    def node_of(self, pid: int) -> str | None:
        """The node a process runs on: the `ray start` process it descends from (Ray puts its workers in
        process groups of their own, so the group does not tell)."""
        starts = {p.pid: name for name, p in self.nodes.items()}
        while pid > 1:
            if pid in starts:
                return starts[pid]
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return None
            pid = int(stat.rsplit(")", 1)[1].split()[1])  # the parent, after the command's parentheses
        return None

    def kill(self, name: str) -> None:
        """The node's raylet, its workers and agents, all at once: a lost machine."""
        os.killpg(self.nodes[name].pid, signal.SIGKILL)
        self.nodes[name].wait()
        self.lost.add(name)

    def stop(self) -> None:
        for p in self.nodes.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # --block tears down what it started
        for p in self.nodes.values():
            if p.poll() is not None:
                continue
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        # Ray workers sit in process groups of their own: whatever of this cluster outlived its node goes.
        for pid in processes_matching(self.temp.encode()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def logs(self) -> str:
        return "\n".join(f"--- {f.name}\n{f.read_text()[-1500:]}" for f in Path(self.temp).glob("*.log"))


def listeners() -> list[str]:
    """Local addresses of every listening TCP socket in this network namespace."""
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
    return sorted({line.split()[3] for line in out.splitlines() if line.strip()})


def processes_matching(*needles: bytes) -> list[int]:
    """Processes whose command line holds every one of `needles`."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if all(n in cmdline for n in needles):
                pids.append(int(entry.name))
    return pids


def part_files(out: Path) -> int:
    return len(list(out.glob("part-*.parquet"))) if out.is_dir() else 0


def vlbatch(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "vlbatch"), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def wait_for_output(out: Path, files: int, alive) -> None:
    """Until the job has committed `files` part files (it is mid-job), or it ended first."""
    while part_files(out) < files and alive():
        time.sleep(0.2)


def run_and_lose_a_node(cluster: Cluster, spec: dict, out: Path, result: dict) -> None:
    """`vlbatch run` against the cluster; mid-job, node w1 or the GPU-stage actor's node is lost."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    log = Path(cluster.temp) / "driver.log"
    started = time.monotonic()
    with open(log, "w") as sink:
        driver = subprocess.Popen(
            [str(BIN / "vlbatch"), "run", spec["job"], "--no-progress"], env=env, stdout=sink,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
    if spec["kill"] != "none":
        wait_for_output(out, spec.get("after_files", 1), lambda: driver.poll() is None)
        hosts = {cluster.node_of(pid) for pid in processes_matching(b"MapBatches(Infer)")}
        result["infer_hosts"] = sorted(h for h in hosts if h)
        if spec["kill"] == "infer":
            victims = [w for w in cluster.workers if w in hosts]
        else:  # a node of CPU stages only: the GPU stage lives on
            victims = [w for w in cluster.workers if w not in hosts]
        victim = (victims or cluster.workers)[0]
        if driver.poll() is None:
            cluster.kill(victim)
            result["killed"] = {"node": victim, "after_s": time.monotonic() - started}
    try:
        driver.wait(timeout=spec.get("timeout_s", 300))
    except subprocess.TimeoutExpired:
        driver.kill()
        driver.wait()
        result["timed_out"] = True
    result.update(returncode=driver.returncode, wall_s=time.monotonic() - started)
    result["driver_tail"] = log.read_text()[-4000:]


def submit_kill_and_resubmit(cluster: Cluster, spec: dict, out: Path, result: dict) -> None:
    """`vlbatch submit`; mid-job its driver is SIGKILLed; the same job submitted again must finish it."""
    env = {**cluster.env, "RAY_ADDRESS": cluster.jobs_api}
    submit = ["submit", spec["job"], "--python", sys.executable]
    started = time.monotonic()
    first = vlbatch(submit, env, timeout=120)
    job_id = first.stdout.split()[0] if first.returncode == 0 and first.stdout else None
    if job_id is None:
        result["error"] = f"submit failed:\n{first.stdout}\n{first.stderr[-3000:]}"
        return
    state = lambda: vlbatch(["status", job_id], env, timeout=60).stdout.strip()
    deadline = started + spec.get("timeout_s", 300)
    wait_for_output(out, spec.get("after_files", 1), lambda: time.monotonic() < deadline)
    drivers = processes_matching(b"jobs.run", b"--spec")
    result["drivers"] = drivers
    for pid in drivers:
        os.kill(pid, signal.SIGKILL)
    result["killed"] = {"driver": drivers, "after_s": time.monotonic() - started} if drivers else None
    while (first_state := state()) not in ("FAILED", "STOPPED", "SUCCEEDED") and time.monotonic() < deadline:
        time.sleep(1)
    result["first_state"] = first_state
    left = max(10.0, deadline - time.monotonic())
    try:
        second = vlbatch([*submit, "--wait"], env, timeout=left)
        result["returncode"] = second.returncode
        second_id = second.stdout.split()[0] if second.stdout else ""
        tail = vlbatch(["logs", second_id], env, timeout=60).stdout if second_id else ""
        result["driver_tail"] = f"{second.stdout}\n{second.stderr[-2000:]}\n{tail[-3000:]}"
    except subprocess.TimeoutExpired:
        result["timed_out"] = True
        result["returncode"] = None
    result["wall_s"] = time.monotonic() - started


def drill(cluster: Cluster, spec: dict) -> dict:
    """One drill on the cluster, which it leaves with two worker nodes again."""
    import yaml

    out = Path(yaml.safe_load(Path(spec["job"]).read_text())["output"])
    result: dict = {"killed": None, "listeners": listeners()}
    result["not_loopback"] = [a for a in result["listeners"] if not LOOPBACK.match(a)]
    if result["not_loopback"]:
        return result
    try:
        if spec["kill"] == "driver":
            submit_kill_and_resubmit(cluster, spec, out, result)
        else:
            run_and_lose_a_node(cluster, spec, out, result)
        cluster.add_workers()
    except Exception as e:
        result["error"] = f"{type(e).__name__}: {e}"
    if result.get("error") or result.get("timed_out"):
        result["node_logs"] = cluster.logs()
    return result


def drills(spec: dict) -> dict:
    """Every drill of `spec`, in order, on one cluster; a drill that leaves it broken fails those after."""
    dashboard = any(d["kill"] == "driver" for d in spec["drills"].values())
    cluster = Cluster(dashboard=dashboard)
    results: dict = {}
    try:
        cluster.start()
        for name, one in spec["drills"].items():
            results[name] = drill(cluster, one)
            if results[name].get("error"):
                break
    except Exception as e:
        results["error"] = f"{type(e).__name__}: {e}\n{cluster.logs()}"
    finally:
        cluster.stop()
        if not os.environ.get("DRILL_KEEP"):
            shutil.rmtree(cluster.temp, ignore_errors=True)
    for name in spec["drills"]:
        results.setdefault(name, {"error": "not run: " + (results.get("error") or "an earlier drill failed")})
    return results


if __name__ == "__main__":
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(sys.argv[2]).write_text(json.dumps(drills(spec), indent=2))
