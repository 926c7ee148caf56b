"""Input expansion: paths, globs, directories, manifests, object-store URIs become items with stable ids."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs
import pytest

import pipeline.sources as sources
from pipeline.decode import files
from pipeline.decode.files import ObjectStream, open_input
from pipeline.sources import Item, expand_inputs, glob_regex, item_id_for


def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


@pytest.fixture
def tree(tmp_path) -> Path:
    for rel in [
        "videos/a.mp4",
        "videos/b.MKV",
        "videos/notes.txt",
        "videos/cover.jpg",
        "videos/sub/c.avi",
        "videos/sub/deeper/d.webm",
        "videos/.hidden/e.mp4",
        "videos/._a.mp4",
        "docs/x.pdf",
        "docs/y.png",
        "docs/z.tiff",
        "docs/sub/w.jpeg",
        "docs/clip.mp4",
    ]:
        touch(tmp_path / rel, rel.encode())
    return tmp_path


def uris(items: list[Item], root: Path) -> list[str]:
    return [os.path.relpath(item.uri, root) for item in items]


def test_directories_recurse_and_filter_by_kind(tree):
    videos = expand_inputs([str(tree / "videos")], "video")
    assert uris(videos, tree) == [
        "videos/a.mp4",
        "videos/b.MKV",
        "videos/sub/c.avi",
        "videos/sub/deeper/d.webm",
    ]
    docs = expand_inputs([str(tree / "docs")], "document")
    assert uris(docs, tree) == ["docs/sub/w.jpeg", "docs/x.pdf", "docs/y.png", "docs/z.tiff"]


def test_items_carry_size_mtime_and_stable_ids(tree):
    (item,) = expand_inputs([str(tree / "docs/x.pdf")], "document")
    stat = os.stat(item.uri)
    assert item.size == stat.st_size and item.mtime == pytest.approx(stat.st_mtime)
    assert item.item_id == item_id_for(item.uri, stat.st_size, stat.st_mtime_ns)
    assert expand_inputs([str(tree / "docs/x.pdf")], "document")[0].item_id == item.item_id
    os.utime(item.uri, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # the file was replaced
    assert expand_inputs([str(tree / "docs/x.pdf")], "document")[0].item_id != item.item_id


def test_globs(tree):
    assert uris(expand_inputs([str(tree / "videos/*.mp4")], "video"), tree) == ["videos/a.mp4"]
    deep = expand_inputs([str(tree / "videos/**/*.*")], "video")
    assert uris(deep, tree) == [
        "videos/a.mp4",
        "videos/b.MKV",
        "videos/sub/c.avi",
        "videos/sub/deeper/d.webm",
    ]
    assert uris(expand_inputs([str(tree / "videos/s?b/[cd].avi")], "video"), tree) == ["videos/sub/c.avi"]
    assert glob_regex("a/**/b*.mp4").match("a/x/y/b1.mp4") and glob_regex("a/**/b*.mp4").match("a/b.mp4")
    assert not glob_regex("a/*.mp4").match("a/x/b.mp4")


def test_manifest_lines_relative_to_the_manifest(tree):
    manifest = tree / "lists" / "batch.txt"
    touch(manifest, f"# a comment\n\n../videos/a.mp4\n{tree}/videos/sub\n../docs/clip.mp4\n".encode())
    items = expand_inputs([str(manifest)], "video")
    assert uris(items, tree) == [
        "videos/a.mp4",
        "videos/sub/c.avi",
        "videos/sub/deeper/d.webm",
        "docs/clip.mp4",
    ]


def test_order_is_input_order_and_duplicates_are_dropped(tree):
    inputs = [str(tree / "videos/sub"), str(tree / "videos"), (tree / "videos/a.mp4").as_uri()]
    items = expand_inputs(inputs, "video")
    assert uris(items, tree) == [
        "videos/sub/c.avi",
        "videos/sub/deeper/d.webm",
        "videos/a.mp4",
        "videos/b.MKV",
    ]
    assert expand_inputs(inputs, "video") == items


def test_explicit_files_are_kept_whatever_their_extension(tree):
    (item,) = expand_inputs([str(tree / "docs/clip.mp4")], "document")
    assert item.uri == str(tree / "docs/clip.mp4")
    assert uris(expand_inputs([str(tree / "videos")], [".jpg"]), tree) == ["videos/cover.jpg"]


def test_missing_inputs_fail_at_start_naming_the_path(tree):
    with pytest.raises(ValueError, match="nothere.mp4 does not exist"):
        expand_inputs([str(tree / "videos"), str(tree / "nothere.mp4")], "video")
    with pytest.raises(ValueError, match="matched no files"):
        expand_inputs([str(tree / "videos/*.mov")], "video")
    with pytest.raises(ValueError, match="no files with extensions"):
        expand_inputs([str(tree / "docs/sub")], "video")
    manifest = touch(tree / "m.txt", b"videos/a.mp4\nvideos/gone.mp4\n")
    with pytest.raises(ValueError, match=r"m\.txt line 2: .*gone\.mp4 does not exist"):
        expand_inputs([str(manifest)], "video")
    with pytest.raises(ValueError, match="unknown input kind"):
        expand_inputs([str(tree)], "audio")


@pytest.fixture
def bucket(monkeypatch) -> pafs.FileSystem:
    """An in-memory object store behind mock:// URIs, reached through the same code as s3:// and gs://."""
    fs = pafs._MockFileSystem()
    for key in ["bucket/raw/a.mp4", "bucket/raw/day2/b.mp4", "bucket/raw/readme.md"]:
        fs.create_dir(key.rsplit("/", 1)[0])
        with fs.open_output_stream(key) as out:
            out.write(key.encode())
    fs.create_dir("bucket/lists")
    with fs.open_output_stream("bucket/lists/m.txt") as out:
        out.write(b"../raw/a.mp4\nmock://bucket/raw/day2/b.mp4\n")
    real = sources.filesystem_from_uri

    def from_uri(uri: str):
        return (fs, uri[len("mock://") :]) if uri.startswith("mock://") else real(uri)

    monkeypatch.setattr(sources, "filesystem_from_uri", from_uri)
    return fs


def test_object_store_uris(bucket):
    items = expand_inputs(["mock://bucket/raw"], "video")
    assert [i.uri for i in items] == ["mock://bucket/raw/a.mp4", "mock://bucket/raw/day2/b.mp4"]
    assert [i.size for i in items] == [len("bucket/raw/a.mp4"), len("bucket/raw/day2/b.mp4")]
    assert [i.uri for i in expand_inputs(["mock://bucket/raw/**/*.mp4"], "video")] == [i.uri for i in items]
    assert [i.uri for i in expand_inputs(["mock://bucket/lists/m.txt"], "video")] == [i.uri for i in items]
    with pytest.raises(ValueError, match="mock://bucket/raw/zzz.mp4 does not exist"):
        expand_inputs(["mock://bucket/raw/zzz.mp4"], "video")
    # Decoders that need a file read remote objects through a temporary local copy that is gone afterwards.
    with open_input(items[1].uri) as path:
        assert Path(path).read_bytes() == b"bucket/raw/day2/b.mp4" and path.endswith(".mp4")
    assert not os.path.exists(path)


def test_remote_objects_stream_to_decoders_that_read_streams_in_bounded_blocks(bucket, monkeypatch):
    data = bytes(range(256)) * 4000  # 1,024,000 bytes
    with bucket.open_output_stream("bucket/raw/big.mp4") as out:
        out.write(data)
    monkeypatch.setattr(files, "STREAM_BLOCK_BYTES", 100_000)
    monkeypatch.setattr(files, "STREAM_BLOCKS_KEPT", 2)
    with open_input("mock://bucket/raw/big.mp4", stream="always") as source:
        assert isinstance(source, ObjectStream) and source.seekable()
        assert source.read(10) == data[:10] and source.requests == 1
        source.seek(-5, os.SEEK_END)
        assert source.read() == data[-5:]
        source.seek(150_000)
        assert source.read(100_000) == data[150_000:250_000]  # across a block edge
        assert source.requests == 4 and len(source._blocks) == 2  # memory stays at two blocks
        source.seek(0)
        assert source.read() == data
    assert source.closed
    # "if_too_big": a copy where it fits the temporary disk, a stream where it does not.
    with open_input("mock://bucket/raw/big.mp4", stream="if_too_big") as source:
        assert isinstance(source, str)
    full = type("Usage", (), {"free": files.TEMP_HEADROOM_BYTES + 1000})
    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: full)
    with open_input("mock://bucket/raw/big.mp4", stream="if_too_big") as source:
        assert isinstance(source, ObjectStream)
    with pytest.raises(ValueError, match=r"big.mp4: 1,024,000 bytes do not fit .* point TMPDIR"):
        with open_input("mock://bucket/raw/big.mp4"):
            pass
