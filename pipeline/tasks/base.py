"""What a job kind is to the pipeline: one `Task` subclass per kind, in a module of its own."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, ClassVar

from schemas import JobBase, RecordBase
from schemas.fields_schema import closed_schema
from schemas.records import fields_type, record_with_fields


class Task:
    """A job kind: its spec and record types, what its units are called, how its items are decoded, planned
    and finished. The stages and the driver ask the task; none of them tests which kind a job is."""

    kind: ClassVar[str]  # the spec's `kind:`
    job: ClassVar[type[JobBase]]
    record: ClassVar[type[RecordBase]]  # one output row per unit
    inputs: ClassVar[str]  # which files of a directory or glob are inputs: "video" or "document"
    unit: ClassVar[str]  # what an item's units are called in counts and messages: "windows", "pages"
    unit_key: ClassVar[str]  # the record column that numbers an item's units (None: the whole item failed)
    # The pixel shape of the smallest unit, to count the prompt's text tokens around the visual ones.
    sample_shape: ClassVar[tuple[int, ...]]

    def decode_config(self, job: Any, budget: Any, model_pixels: tuple[int, int]) -> Any:
        """The decoder's settings for `job`, every unit sized to fit `budget` (a `TokenBudget`)."""
        raise NotImplementedError

    def decoder(self, config: Any) -> Callable[[], Callable[[dict[str, Any]], Iterator[dict[str, Any]]]]:
        """A picklable factory of the decoder: item row in, one row per unit out (`pipeline.rows` terms)."""
        raise NotImplementedError

    def unit_shapes(self, uri: str, config: Any) -> Iterator[tuple[list[int], int]]:
        """For `vlbatch plan`, from metadata only: each unit's pixel shape and the frames the model sees."""
        raise NotImplementedError

    def finish(self, row: dict[str, Any], job: Any) -> dict[str, Any]:
        """A result row made final (parsed fields, flags) before it is written."""
        return row

    def fields_schema(self, job: Any) -> dict[str, Any] | None:
        """The user's JSON schema of the `fields` column, if the job gives one."""
        return None

    def json_schema(self, job: Any) -> dict[str, Any] | None:
        """The JSON schema generation is constrained to, if any (the user's, or a built-in one)."""
        schema = self.fields_schema(job)
        return closed_schema(schema) if schema is not None else None

    def output_record(self, job: Any) -> type[RecordBase]:
        """The record type of `job`'s rows: the kind's, with `fields` typed from the job's schema if any."""
        return record_with_fields(self.record, self.fields_schema(job))

    def parse_fields(self, row: dict[str, Any], job: Any) -> dict[str, Any]:
        """`fields` and `fields_valid` of an ok row generated under a JSON schema; a row cut at
        max_new_tokens is not valid, whatever its text."""
        model = fields_type(self.output_record(job))
        if row["status"] != "ok" or model is None:
            return row
        fields = None
        if row.get("finish_reason") != "length":
            try:
                fields = model.model_validate_json(row.get("text") or "")
            except ValueError:
                fields = None
        row["fields"] = fields.model_dump(by_alias=True) if fields is not None else None
        row["fields_valid"] = fields is not None
        return row
