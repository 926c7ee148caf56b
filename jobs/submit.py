"""Submit a job to a Ray cluster through the Ray Jobs API, with this project as the runtime environment."""

from __future__ import annotations

import base64
import json
import os
import shlex
import time
from pathlib import Path

from schemas import CaptionVideosJob, OcrDocumentsJob, validate_job

PROJECT_DIR = Path(__file__).resolve().parent.parent
# What the cluster does not need from a checkout; working_dir uploads are capped by Ray (about 500 MiB).
UPLOAD_EXCLUDES = [
    ".venv",
    ".git",
    "demo_out",
    "**/__pycache__",
    "*.egg-info",
    ".pytest_cache",
    ".ruff_cache",
    "build",
    ".whl",
    ".dev",
    "*.parquet",
    "*.safetensors",
]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def resolve_address(address: str | None) -> str:
    """The Jobs API address from --address, else RAY_ADDRESS."""
    address = address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise ValueError("no Ray cluster given: pass --address http://HEAD:8265 or set RAY_ADDRESS")
    if "://" not in address:
        address = f"http://{address}"
    return address


def _client(address: str | None):
    from ray.job_submission import JobSubmissionClient

    address = resolve_address(address)
    try:
        return JobSubmissionClient(address)
    except Exception as e:
        if "uthentication" in str(e):  # Ray's token auth: the client sends a token only when told to
            raise ValueError(
                f"{address}: the cluster requires a token; set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN "
                "(or RAY_AUTH_TOKEN_PATH, default ~/.ray/auth_token), as for Ray's own job CLI"
            ) from e
        raise ValueError(f"{address}: cannot reach the Ray Jobs API ({e})") from e


def absolute_paths(job: CaptionVideosJob | OcrDocumentsJob) -> CaptionVideosJob | OcrDocumentsJob:
    """The job with local relative paths made absolute: the entrypoint runs in an unpacked copy elsewhere."""

    def fix(p: str) -> str:
        return p if "://" in p or os.path.isabs(p) else os.path.abspath(p)

    data = job.model_dump(mode="json")
    data["inputs"] = [fix(p) for p in data["inputs"]]
    data["output"], data["model"] = fix(data["output"]), fix(data["model"])
    return validate_job(data)


def encode_spec(job: CaptionVideosJob | OcrDocumentsJob) -> str:
    """The validated spec as one shell-safe token (urlsafe base64 of its JSON)."""
    return base64.urlsafe_b64encode(json.dumps(job.model_dump(mode="json")).encode()).decode()


def decode_spec(token: str) -> CaptionVideosJob | OcrDocumentsJob:
    return validate_job(json.loads(base64.urlsafe_b64decode(token.encode())), source="--spec")


def submit(
    job: CaptionVideosJob | OcrDocumentsJob,
    address: str | None = None,
    python: str = "python",
    project_dir: Path = PROJECT_DIR,
) -> str:
    """Submit `job`; returns the Ray job id. The cluster's Python must have vlbatch's dependencies."""
    job = absolute_paths(job)
    entrypoint = f"{shlex.quote(python)} -m jobs.run --spec {encode_spec(job)}"
    runtime_env = {"working_dir": str(project_dir), "excludes": UPLOAD_EXCLUDES}
    return _client(address).submit_job(
        entrypoint=entrypoint, runtime_env=runtime_env, metadata={"vlbatch.kind": job.kind}
    )


def status(job_id: str, address: str | None = None) -> str:
    """PENDING, RUNNING, SUCCEEDED, FAILED or STOPPED."""
    return str(_client(address).get_job_status(job_id).value)


def logs(job_id: str, address: str | None = None) -> str:
    return _client(address).get_job_logs(job_id)


def wait(job_id: str, address: str | None = None, timeout_s: float = 3600.0, poll_s: float = 2.0) -> str:
    """Poll until the job ends; returns its final status."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(job_id, address)
        if state in TERMINAL:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} still {state} after {timeout_s:.0f} s")
        time.sleep(poll_s)
