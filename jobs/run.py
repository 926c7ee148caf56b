"""Run a job on the Ray given by RAY_ADDRESS, or on a Ray started on this machine bound to 127.0.0.1.

Also the entrypoint of submitted jobs: `python -m jobs.run --spec TOKEN` (see jobs.submit).
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import sys

from schemas import CaptionVideosJob, OcrDocumentsJob

CONNECT_TIMEOUT_S = 5.0


def local_cpus(job: CaptionVideosJob | OcrDocumentsJob) -> int:
    """Logical CPUs for a local Ray: at least what all the job's stages ask for at once, so none starves."""
    from pipeline.chain import cpus_beside_infer

    r = job.resources
    wanted = cpus_beside_infer(job) + r.gpu_workers * (r.cpus_per_gpu_worker or 1)
    return max(os.cpu_count() or 1, math.ceil(wanted))


def loopback_only() -> None:
    """Make a Ray started from this process bind every port to 127.0.0.1.

    Ray listens on all interfaces unless told the node is no cluster member; this is that switch, read by
    ray when imported (patched here in case it already is) and by the processes it starts (environment).
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def resolve_address(address: str) -> str:
    """HOST:PORT of a Ray address; "auto" is the cluster the last `ray start` on this machine recorded."""
    if address != "auto":
        return address
    from ray._private.utils import read_ray_address

    recorded = read_ray_address(None)
    if not recorded:
        raise ValueError(
            "RAY_ADDRESS=auto, but no `ray start` cluster is recorded on this machine; start one, give its "
            "address (HOST:PORT), or unset RAY_ADDRESS to run on a local Ray"
        )
    return recorded


def check_reachable(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Fail at once, naming the address, where no Ray cluster listens (ray.init would retry for ever)."""
    target = address.removeprefix("ray://")
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"Ray address {address!r}: write it as HOST:PORT (e.g. HEAD:6379) or ray://HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise ValueError(
            f"no Ray cluster answers at {address} ({e.strerror or e}); start it (`ray start --head`), fix "
            "RAY_ADDRESS / --address, or unset RAY_ADDRESS to run on a local Ray"
        ) from None


def connect_ray(
    job: CaptionVideosJob | OcrDocumentsJob | None = None, address: str | None = None, verbose: bool = False
) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, else start a local Ray listening on 127.0.0.1 only."""
    import ray

    from pipeline.progress import drop_ray_noise, quiet_local_ray, ray_logging_level

    if ray.is_initialized():
        return
    drop_ray_noise(verbose)
    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise ValueError(
            f"RAY_ADDRESS={address} is a Jobs API address: submit with `vlbatch submit job.yaml`, or run "
            "here against the cluster's GCS address (e.g. RAY_ADDRESS=HEAD:6379 or ray://HEAD:10001)"
        )
    if address:
        check_reachable(resolve_address(address))
        ray.init(address=address, logging_level=ray_logging_level(verbose))
        return
    loopback_only()
    quiet_local_ray(verbose)
    # address="local": a new Ray of our own. Without it ray.init joins the cluster that the last `ray start`
    # recorded in /tmp/ray, and waits minutes on it if that cluster was killed rather than stopped.
    ray.init(
        address="local",
        num_cpus=local_cpus(job) if job is not None else None,
        _node_ip_address="127.0.0.1",
        dashboard_host="127.0.0.1",
        include_dashboard=False,
        logging_level=ray_logging_level(verbose),
    )


def run(
    job: CaptionVideosJob | OcrDocumentsJob,
    address: str | None = None,
    progress: bool = True,
    verbose: bool = False,
):
    """Run `job` to the end and return its summary; the manifest lies beside the Parquet output."""
    from pipeline.driver import run_job

    connect = lambda: connect_ray(job, address, verbose)
    return run_job(job, progress=progress, connect=connect, verbose=verbose)


def main(argv: list[str] | None = None) -> int:
    from jobs.submit import decode_spec

    parser = argparse.ArgumentParser(prog="python -m jobs.run", description=__doc__)
    parser.add_argument("--spec", required=True, help="job spec token written by `vlbatch submit`")
    args = parser.parse_args(argv)
    summary = run(decode_spec(args.spec))
    return 0 if summary.finished else 1


if __name__ == "__main__":
    sys.exit(main())
