"""The job spec reference: generated from the models, complete, and the committed copy never stale."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from jobs.cli import main
from schemas import JobSpecError, validate_job
from schemas.jobs import CaptionVideosJob, JobBase, Limits, OcrDocumentsJob, Resources, Sampling
from schemas.reference import job_spec_reference

ROOT = Path(__file__).resolve().parent.parent
ROW = re.compile(r"^\| `([a-z_.]+)` \| ([^|]+) \| ([^|]+) \| (.*) \|$", re.MULTILINE)


def test_the_docs_copy_is_what_the_command_prints(capsys):
    assert main(["spec", "--reference"]) == 0
    printed = capsys.readouterr().out
    assert printed == job_spec_reference()
    copy = (ROOT / "docs" / "job_spec.md").read_text()
    assert copy == printed, "docs/job_spec.md is stale: run `vlbatch spec --reference > docs/job_spec.md`"
    assert "docs/job_spec.md" in (ROOT / "README.md").read_text()


def test_every_key_is_there_with_its_type_default_and_meaning():
    rows = {
        key: (kind, default, meaning) for key, kind, default, meaning in ROW.findall(job_spec_reference())
    }
    expected = set(JobBase.model_fields)
    for model in (CaptionVideosJob, OcrDocumentsJob):
        expected |= set(model.model_fields)
    for prefix, model in (("sampling.", Sampling), ("resources.", Resources), ("limits.", Limits)):
        expected |= {prefix + name for name in model.model_fields}
    assert set(rows) == expected
    assert all(
        kind.strip() and default.strip() and meaning.strip() for kind, default, meaning in rows.values()
    )
    assert rows["sampling.max_new_tokens"][:2] == ("int, >= 1", "`512`")
    assert rows["inputs"][1] == "**required**" and rows["limits"][1] == "(below)"
    assert rows["caption_format"][0] == '"text" or "json"'
    assert rows["clip_seconds"][0] == "float or null, > 0"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"sampling": {"temprature": 0.5}},
            "sampling.temprature: unknown key; did you mean sampling.temperature?",
        ),
        ({"clip_second": 4}, "clip_second: unknown key; did you mean clip_seconds?"),
        (
            {"resources": {"gpu_worker": 2}},
            "resources.gpu_worker: unknown key; did you mean resources.gpu_workers?",
        ),
        ({"zzzz": 1}, "zzzz: unknown key; check the spelling (see the job spec reference"),
    ],
)
def test_a_misspelt_key_gets_a_did_you_mean(extra, message):
    spec = {"kind": "caption_videos", "inputs": ["v.mp4"], "output": "out", "model": "m", **extra}
    with pytest.raises(JobSpecError) as info:
        validate_job(spec, source="job.yaml")
    assert message in str(info.value)


def test_did_you_mean_looks_at_the_keys_of_the_kind_written():
    spec = {"kind": "ocr_documents", "inputs": ["d.pdf"], "output": "out", "model": "m", "page_range": "1-2"}
    with pytest.raises(JobSpecError, match="did you mean page_ranges"):
        validate_job(spec)
    spec = {"kind": "caption_videos", "inputs": ["v.mp4"], "output": "out", "model": "m", "page_range": "1"}
    with pytest.raises(JobSpecError, match="page_range: unknown key; check the spelling"):
        validate_job(spec)
