"""vlbatch schemas: job specs and output records (the Parquet schema is derived from the records)."""

from schemas.jobs import (
    CaptionVideosJob,
    JobBase,
    JobSpec,
    JobSpecError,
    Limits,
    OcrDocumentsJob,
    Resources,
    Sampling,
    Storage,
    load_job,
    parse_page_ranges,
    validate_job,
)
from schemas.records import (
    SCHEMA_VERSION,
    CaptionFields,
    CaptionRecord,
    PageRecord,
    RecordBase,
    arrow_schema,
    records_from_rows,
    records_to_table,
)

__all__ = [
    "SCHEMA_VERSION",
    "CaptionFields",
    "CaptionRecord",
    "CaptionVideosJob",
    "JobBase",
    "JobSpec",
    "JobSpecError",
    "Limits",
    "OcrDocumentsJob",
    "PageRecord",
    "RecordBase",
    "Resources",
    "Sampling",
    "Storage",
    "arrow_schema",
    "load_job",
    "parse_page_ranges",
    "records_from_rows",
    "records_to_table",
    "validate_job",
]
