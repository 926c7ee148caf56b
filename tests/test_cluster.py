"""A Ray head on 127.0.0.1, a job submitted to it with `vlbatch submit`, its output checked, the head stopped.

The head runs under `ray start --block` and is stopped by signalling that process: `ray stop` would stop
every Ray on the machine, including ones this test did not start. It requires a token of its own (Ray's
token authentication), which the `vlbatch` commands read from the environment, as Ray's own CLI does.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """(Jobs API address, environment without RAY_ADDRESS) of a fresh single-node cluster."""
    temp_dir = tempfile.mkdtemp(prefix="vlb-ray-", dir="/tmp")  # short: Ray's socket paths must stay short
    dashboard = free_port()
    token = secrets.token_hex(32)
    (Path(temp_dir) / "token").write_text(token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"  # every port on 127.0.0.1 (see jobs.run.loopback_only)
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(Path(temp_dir) / "token"))
    env["RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S"] = "0"  # nothing to drain: stop at once on SIGTERM
    ports = {
        "--port": free_port(),
        "--dashboard-port": dashboard,
        "--ray-client-server-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--metrics-export-port": free_port(),
    }
    cmd = [
        str(BIN / "ray"),
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--include-dashboard",
        "true",
        "--temp-dir",
        temp_dir,
        "--num-cpus",
        "8",
        "--disable-usage-stats",
    ]
    cmd += [a for flag, port in ports.items() for a in (flag, str(port))]
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        auth = {"Authorization": f"Bearer {token}"}
        request = urllib.request.Request(f"{address}/api/version", headers=auth)
        while True:
            try:
                urllib.request.urlopen(request, timeout=5).read()
                break
            except OSError:
                if head.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail(f"no Ray head:\n{(Path(temp_dir) / 'head.log').read_text()[-3000:]}")
                time.sleep(1)
        yield address, env
    finally:
        head.send_signal(signal.SIGTERM)  # --block tears down the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)  # the session this fixture created, nothing else
            head.wait()
        log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def vlbatch(args: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [str(BIN / "vlbatch"), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def test_submit_to_a_ray_cluster(tmp_path, ray_head, pipeline_corpus):
    address, env = ray_head
    docs = pipeline_corpus["root"] / "docs"
    out = tmp_path / "out"
    inputs = [str(docs / "e.pdf"), str(docs / "g.png")]
    spec = {**pipeline_corpus["ocr"], "inputs": inputs, "output": str(out)}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))

    sub = vlbatch(
        ["submit", str(tmp_path / "job.yaml"), "--address", address, "--python", sys.executable, "--wait"],
        env,
    )
    job_id = sub.stdout.split()[0] if sub.stdout else ""
    logs = vlbatch(["logs", job_id, "--address", address], env).stdout if job_id else ""
    assert sub.returncode == 0, f"{sub.stdout}\n{sub.stderr[-3000:]}\n{logs[-3000:]}"
    assert job_id.startswith("raysubmit_") and f"{job_id}: SUCCEEDED" in sub.stdout

    status = vlbatch(["status", job_id], {**env, "RAY_ADDRESS": address})
    assert status.returncode == 0 and status.stdout.strip() == "SUCCEEDED"
    assert "vlbatch ocr_documents: 2 items" in logs

    df = pd.read_parquet(out)
    assert len(df) == 3 + 1 and (df.status == "ok").all()
    assert not df.duplicated(["item_id", "page_index"]).any()
