"""Inputs as local files for the decoders, and the error an input that cannot be decoded raises."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.sources import resolve


class DecodeError(ValueError):
    """An input that cannot be decoded (damaged, unsupported, over a limit); the message names the file."""

    stage = "decode"


@contextmanager
def local_file(uri: str) -> Iterator[str]:
    """A local path holding `uri`'s bytes: the file itself, or a temporary copy of a remote object, fetched
    by the worker that decodes it and deleted when the item is done."""
    fs, path, prefix = resolve(uri)
    if not prefix:
        if not os.path.isfile(path):
            raise DecodeError(f"{uri}: no such file (moved or deleted after the job started?)")
        if not os.access(path, os.R_OK):
            raise DecodeError(f"{uri}: permission denied; make the file readable by the job's user")
        yield path
        return
    # The decoders need a seekable local file: one item's bytes at a time per worker, deleted when it is done.
    try:
        size = fs.get_file_info(path).size or 0
    except OSError as e:
        raise DecodeError(f"{uri}: cannot download ({e})") from e
    free = shutil.disk_usage(tempfile.gettempdir()).free
    if size > free:
        raise DecodeError(
            f"{uri}: {size:,} bytes do not fit in the {free:,} free bytes of {tempfile.gettempdir()}; point "
            "TMPDIR at a larger disk"
        )
    fd, tmp = tempfile.mkstemp(prefix="vlbatch-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as out, fs.open_input_stream(path) as src:
            shutil.copyfileobj(src, out, length=1 << 22)
    except OSError as e:
        os.unlink(tmp)
        raise DecodeError(f"{uri}: cannot download ({e})") from e
    try:
        yield tmp
    finally:
        os.unlink(tmp)
