"""`vlbatch`: run, plan and submit caption/OCR jobs."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

from schemas import JobSpecError, load_job, validate_job
from schemas.jobs import apply_overrides


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a field of the spec (dotted path, YAML value), e.g. resources.gpu_workers=4",
    )


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress line")
    p.add_argument(
        "--verbose", action="store_true", help="Ray's own progress bars and log lines, not the progress line"
    )


def _address(p: argparse.ArgumentParser, help: str) -> None:
    p.add_argument("--address", default=None, help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vlbatch", description="Batch Qwen2-VL over videos and documents on Ray."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run a job spec (on RAY_ADDRESS, else a local Ray)")
    p.add_argument("spec", help="job.yaml")
    _add_set(p)
    _add_output_flags(p)

    for name, kind, what in (
        ("caption-videos", "caption_videos", "caption videos"),
        ("ocr-documents", "ocr_documents", "transcribe documents and images"),
    ):
        p = sub.add_parser(name, help=f"{what} without a spec file")
        p.set_defaults(kind=kind)
        p.add_argument(
            "inputs", nargs="+", metavar="INPUT", help="files, directories, globs, manifests, URIs"
        )
        p.add_argument("--out", required=True, help="output directory (Parquet + _manifest.json)")
        p.add_argument("--model", required=True, help="checkpoint directory (Hugging Face layout)")
        p.add_argument("--prompt", default=None)
        _add_set(p)
        _add_output_flags(p)

    p = sub.add_parser("plan", help="what a job will cost, from metadata only (no model is loaded)")
    p.add_argument("spec", help="job.yaml")
    _add_set(p)
    p.add_argument("--json", action="store_true", help="print the plan as JSON")

    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster; prints the job id")
    p.add_argument("spec", help="job.yaml")
    _add_set(p)
    _address(p, "Jobs API of the head, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument("--python", default="python", help="the cluster's Python (default: python)")
    p.add_argument("--wait", action="store_true", help="wait for the job to end; exit 0 only if it succeeded")

    for name, what in (("status", "state of a submitted job"), ("logs", "logs of a submitted job")):
        p = sub.add_parser(name, help=what)
        p.add_argument("job_id")
        _address(p, "Jobs API of the head (default: RAY_ADDRESS)")

    p = sub.add_parser("spec", help="the job spec reference: every key, its type, default and meaning")
    p.add_argument("--reference", action="store_true", required=True, help="print it as markdown")

    p = sub.add_parser("report", help="an HTML page to review a job's output: samples, errors, throughput")
    p.add_argument("out", metavar="OUT", help="the job's output directory")
    p.add_argument("--html", default=None, metavar="FILE", help="output file (default: OUT/_report.html)")
    p.add_argument("--samples", type=int, default=12, metavar="N", help="units shown with their media (12)")
    return parser


def _job_from_args(args: argparse.Namespace):
    if hasattr(args, "spec"):
        return load_job(args.spec, args.overrides)
    data = {"kind": args.kind, "inputs": args.inputs, "output": args.out, "model": args.model}
    if args.prompt is not None:
        data["prompt"] = args.prompt
    apply_overrides(data, args.overrides)
    return validate_job(data, source=None)  # main() names the command in front of the message


def cmd_run(args: argparse.Namespace) -> int:
    from jobs.run import run

    summary = run(_job_from_args(args), progress=not args.no_progress, verbose=args.verbose)
    return 0 if summary.finished else 1


def cmd_plan(args: argparse.Namespace) -> int:
    from jobs.plan import plan_job

    plan = plan_job(_job_from_args(args))
    print(plan.to_json() if args.json else plan.describe())
    if plan.gpu is not None and plan.gpu.problem():
        return 1
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from jobs import submit

    job_id = submit.submit(_job_from_args(args), args.address, python=args.python)
    print(job_id, flush=True)
    if not args.wait:
        return 0
    state = submit.wait(job_id, args.address)
    print(f"{job_id}: {state}")
    return 0 if state == "SUCCEEDED" else 1


def cmd_status(args: argparse.Namespace) -> int:
    from jobs import submit

    print(submit.status(args.job_id, args.address))
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from jobs import submit

    print(submit.logs(args.job_id, args.address), end="")
    return 0


def cmd_spec(args: argparse.Namespace) -> int:
    from schemas.reference import job_spec_reference

    print(job_spec_reference(), end="")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from jobs.report import write_report

    print(write_report(args.out, args.html, samples=args.samples))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": cmd_run,
    "caption-videos": cmd_run,
    "ocr-documents": cmd_run,
    "plan": cmd_plan,
    "submit": cmd_submit,
    "status": cmd_status,
    "logs": cmd_logs,
    "report": cmd_report,
    "spec": cmd_spec,
}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (JobSpecError, ValueError, FileNotFoundError) as e:
        print(f"vlbatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        from pipeline.driver import JobStalled  # here: the driver imports torch, which `plan` never needs

        if not isinstance(e, JobStalled):
            raise
        print(f"vlbatch {args.command}: error: {e.advice()}", file=sys.stderr)
        return 3
    except KeyboardInterrupt as e:
        from pipeline.driver import JobInterrupted

        done = (
            f"{e.items_done} of {e.items} items are committed in {e.output}; "
            if isinstance(e, JobInterrupted)
            else ""
        )
        message = f"interrupted; {done}run the same command again to resume"
        print(f"\nvlbatch {args.command}: {message}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
