"""Inputs for the decoders: a local path, a bounded temporary copy of a remote object, or a seekable stream
of it; and the error an input that cannot be decoded raises."""

from __future__ import annotations

import io
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import pyarrow.fs as pafs

from pipeline.sources import resolve

STREAM_BLOCK_BYTES = 8 << 20  # one ranged GET per block: few requests, whatever size the decoder reads
STREAM_BLOCKS_KEPT = 4  # blocks a stream keeps (a decoder seeking back a little reads no block twice)
TEMP_HEADROOM_BYTES = 256 << 20  # a download leaves this much of the temporary disk free


class DecodeError(ValueError):
    """An input that cannot be decoded (damaged, unsupported, over a limit); the message names the file."""

    stage = "decode"


class ObjectStream(io.RawIOBase):
    """A remote object as a seekable, read-only file, fetched in whole blocks by ranged reads and holding
    at most `STREAM_BLOCKS_KEPT` of them, so its memory stays bounded however large the object."""

    def __init__(self, fs: pafs.FileSystem, path: str, size: int, uri: str):
        self.uri, self.size, self.requests = uri, size, 0
        self._file = fs.open_input_file(path)
        self._blocks: OrderedDict[int, bytes] = OrderedDict()
        self._at = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._at

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._at, io.SEEK_END: self.size}[whence]
        self._at = max(0, base + offset)
        return self._at

    def readinto(self, buffer) -> int:
        view = memoryview(buffer).cast("B")
        done = 0
        while done < len(view) and self._at < self.size:
            index, start = divmod(self._at, STREAM_BLOCK_BYTES)
            block = self._block(index)
            n = min(len(view) - done, len(block) - start)
            view[done : done + n] = block[start : start + n]
            done += n
            self._at += n
        return done

    def _block(self, index: int) -> bytes:
        block = self._blocks.get(index)
        if block is None:
            try:
                block = self._file.read_at(STREAM_BLOCK_BYTES, index * STREAM_BLOCK_BYTES)
            except OSError as e:
                raise DecodeError(f"{self.uri}: cannot read from object storage ({e})") from e
            self.requests += 1
            self._blocks[index] = block
            while len(self._blocks) > STREAM_BLOCKS_KEPT:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(index)
        return block

    def close(self) -> None:
        if not self.closed:
            self._file.close()
            self._blocks.clear()
        super().close()


@contextmanager
def open_input(
    uri: str, stream: Literal["never", "always", "if_too_big"] = "never"
) -> Iterator[str | ObjectStream]:
    """`uri` as a decoder reads it: a local file's path, or for a remote object a temporary copy (fetched by
    the worker that decodes it, deleted when the item is done) or, for decoders that read a stream, an
    `ObjectStream`: always with `stream="always"`, and with "if_too_big" when a copy would not fit the
    temporary disk."""
    fs, path, prefix = resolve(uri)
    if not prefix:
        if not os.path.isfile(path):
            raise DecodeError(f"{uri}: no such file (moved or deleted after the job started?)")
        if not os.access(path, os.R_OK):
            raise DecodeError(f"{uri}: permission denied; make the file readable by the job's user")
        yield path
        return
    try:
        size = fs.get_file_info(path).size or 0
    except OSError as e:
        raise DecodeError(f"{uri}: cannot download ({e})") from e
    free = shutil.disk_usage(tempfile.gettempdir()).free - TEMP_HEADROOM_BYTES
    if stream == "always" or (stream == "if_too_big" and size > free):
        with ObjectStream(fs, path, size, uri) as source:
            yield source
        return
    if size > free:
        raise DecodeError(
            f"{uri}: {size:,} bytes do not fit in the {max(free, 0):,} free bytes of {tempfile.gettempdir()} "
            f"(less {TEMP_HEADROOM_BYTES >> 20} MiB kept free); point TMPDIR at a larger disk"
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
