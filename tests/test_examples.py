"""The job specs shown in the README validate against the schemas users will run them with."""

from pathlib import Path

import pytest

from schemas.jobs import CaptionVideosJob, OcrDocumentsJob, load_job

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.parametrize(
    ("name", "kind"), [("caption_videos.yaml", CaptionVideosJob), ("ocr_documents.yaml", OcrDocumentsJob)]
)
def test_example_spec_validates(name, kind):
    job = load_job(EXAMPLES / name)
    assert isinstance(job, kind)
    assert job.inputs and job.output and job.model
