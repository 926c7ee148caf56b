"""Turn a job's inputs (paths, globs, directories, manifests, s3:// gs:// URIs) into items with stable ids.

Local and remote inputs go through the same pyarrow.fs code: a local path is a LocalFileSystem path.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pyarrow.fs as pafs

from pipeline import storage

VIDEO_EXTENSIONS = frozenset(
    ".mp4 .m4v .mkv .avi .mov .webm .mpg .mpeg .m2v .ts .mts .m2ts .wmv .asf .flv .3gp .ogv .vob".split()
)
DOCUMENT_EXTENSIONS = frozenset(".pdf .png .jpg .jpeg .tif .tiff .bmp .webp".split())
MANIFEST_EXTENSIONS = frozenset({".txt"})
KINDS = {"video": VIDEO_EXTENSIONS, "document": DOCUMENT_EXTENSIONS}
GLOB_CHARS = re.compile(r"[*?\[]")


@dataclass(frozen=True)
class Item:
    """One input file. `item_id` changes when the file is replaced (size or mtime), so resume redoes it."""

    uri: str
    size: int
    mtime: float | None  # seconds since the epoch; None where the filesystem does not say
    item_id: str


def item_id_for(uri: str, size: int, mtime_ns: int | None) -> str:
    """Stable identity of a file version: a hash of its URI, size and modification time."""
    key = f"{uri}\0{size}\0{mtime_ns if mtime_ns is not None else ''}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def filesystem_from_uri(uri: str) -> tuple[pafs.FileSystem, str]:
    """pyarrow's filesystem for a URI with a scheme (s3://, gs://, hdfs://, ...) and the path inside it."""
    return storage.filesystem_from_uri(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """(filesystem, path inside it, prefix that turns such a path back into a URI) of a path or URI."""
    return storage.resolve(uri, "input", filesystem_from_uri)


def _extensions(kinds: str | Iterable[str]) -> frozenset[str]:
    names = [kinds] if isinstance(kinds, str) else list(kinds)
    out: set[str] = set()
    for name in names:
        if name in KINDS:
            out |= KINDS[name]
        elif name.startswith("."):
            out.add(name.lower())
        else:
            raise ValueError(
                f"unknown input kind {name!r}; use one of {sorted(KINDS)} or extensions like '.mp4'"
            )
    return frozenset(out)


def _suffix(path: str) -> str:
    return os.path.splitext(path)[1].lower()


def _component_regex(part: str) -> str:
    out, i = [], 0
    while i < len(part):
        c = part[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[" and "]" in part[i + 2 :]:
            end = part.index("]", i + 2)
            body = part[i + 1 : end]
            out.append("[" + ("^" + body[1:] if body.startswith("!") else body) + "]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return "".join(out)


def glob_regex(pattern: str) -> re.Pattern[str]:
    """A regex for '/'-separated relative paths: * and ? stay within a component, ** spans directories."""
    parts = pattern.split("/")
    out = []
    for k, part in enumerate(parts):
        last = k == len(parts) - 1
        if part == "**":
            out.append(".*" if last else "(?:[^/]+/)*")
        else:
            out.append(_component_regex(part) + ("" if last else "/"))
    return re.compile("".join(out) + r"\Z")


def _item(info: pafs.FileInfo, prefix: str) -> Item:
    uri = prefix + info.path
    mtime = info.mtime_ns / 1e9 if info.mtime_ns is not None else None
    return Item(
        uri=uri, size=info.size or 0, mtime=mtime, item_id=item_id_for(uri, info.size or 0, info.mtime_ns)
    )


def _expand_glob(fs: pafs.FileSystem, path: str, prefix: str, exts: frozenset[str], where: str) -> list[Item]:
    parts = path.split("/")
    first = next(i for i, p in enumerate(parts) if GLOB_CHARS.search(p))
    base = "/".join(parts[:first]) or "/"
    pattern = "/".join(parts[first:])
    regex = glob_regex(pattern)
    recursive = "**" in parts[first:] or len(parts) - first > 1
    try:
        infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True, recursive=recursive))
    except OSError as e:
        raise storage.explain(e, f"{prefix}{base}", where) from e
    items = []
    for info in infos:
        rel = info.path[len(base) :].lstrip("/")
        if info.type == pafs.FileType.File and regex.match(rel) and _suffix(info.path) in exts:
            if not any(p.startswith(".") for p in rel.split("/")):
                items.append(_item(info, prefix))
    if not items:
        raise ValueError(f"{where}: matched no files with extensions {' '.join(sorted(exts))}")
    return sorted(items, key=lambda it: it.uri)


def _expand_dir(fs: pafs.FileSystem, path: str, prefix: str, exts: frozenset[str], where: str) -> list[Item]:
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, recursive=True))
    except OSError as e:
        raise storage.explain(e, f"{prefix}{path}", where) from e
    # Dot files and dot directories are OS and editor droppings (.DS_Store, AppleDouble ._a.mp4), not media.
    items = [
        _item(info, prefix)
        for info in infos
        if info.type == pafs.FileType.File
        and _suffix(info.path) in exts
        and not any(p.startswith(".") for p in info.path[len(path) :].split("/"))
    ]
    if not items:
        raise ValueError(f"{where}: directory holds no files with extensions {' '.join(sorted(exts))}")
    return sorted(items, key=lambda it: it.uri)


def _read_manifest(fs: pafs.FileSystem, path: str, prefix: str) -> list[tuple[int, str]]:
    """(line number, entry) of a manifest; relative entries are relative to the manifest's directory."""
    try:
        with fs.open_input_stream(path) as f:
            text = f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"manifest {prefix}{path}: cannot read it as UTF-8 text ({e})") from e
    entries = []
    base = path.rsplit("/", 1)[0] if "/" in path else ""
    for n, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "://" not in line and not os.path.isabs(line):
            line = prefix + posixpath.normpath(f"{base}/{line}" if base else line)
        entries.append((n, line))
    return entries


def _expand_one(entry: str, exts: frozenset[str], where: str, allow_manifest: bool) -> list[Item]:
    fs, path, prefix = resolve(entry)
    if GLOB_CHARS.search(path):
        return _expand_glob(fs, path, prefix, exts, where)
    try:
        info = fs.get_file_info(path)
    except OSError as e:
        raise storage.explain(e, entry, where) from e
    if info.type == pafs.FileType.NotFound:
        storage.check_reachable(fs, path, entry, where)  # names a missing bucket as such
        raise ValueError(f"{where}: {entry} does not exist; fix the path or remove it from the inputs")
    if info.type == pafs.FileType.Directory:
        return _expand_dir(fs, path, prefix, exts, where)
    if _suffix(path) in MANIFEST_EXTENSIONS:
        if not allow_manifest:
            raise ValueError(f"{where}: {entry} is a manifest inside a manifest; list media files instead")
        items = []
        for n, line in _read_manifest(fs, path, prefix):
            items.extend(_expand_one(line, exts, f"manifest {entry} line {n}", allow_manifest=False))
        return items
    return [_item(info, prefix)]  # named explicitly: kept whatever its extension


def expand_inputs(inputs: Sequence[str], kinds: str | Iterable[str]) -> list[Item]:
    """Items of all inputs, in input order (each expansion sorted), each file once.

    `kinds` is "video", "document" or a list of extensions; it filters directories and globs, not files
    named explicitly. A path that does not exist raises ValueError naming it.
    """
    exts = _extensions(kinds)
    seen: set[str] = set()
    items: list[Item] = []
    for entry in inputs:
        for item in _expand_one(entry, exts, f"input {entry}", allow_manifest=True):
            if item.uri not in seen:
                seen.add(item.uri)
                items.append(item)
    return items
