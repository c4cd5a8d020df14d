"""Reading local data files, and the one error type for bad input.

Invariant: every problem with input data surfaces as a :class:`DataError` whose message is one line
that names the file (and the record, where there is one), raised while the task or dataset is built,
never later in the middle of training. ``run.py`` catches it and exits non-zero with that line.

Formats (each optionally gzipped, ``.gz``): JSON (``.json``: one document, a list of records, or
JSON lines), JSON lines (``.jsonl``), Parquet (``.parquet``) and plain text (anything else, e.g.
``.txt``). A path spec is a file, a glob or a directory (every data file inside, recursively), or a
list of those.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, Iterator, Sequence

SPLITS = ("train", "validation", "test")
KINDS = ("text", "qa")
#: Suffixes (after stripping ``.gz``) read as structured records; anything else is plain text.
RECORD_FORMATS = {".json": "json", ".jsonl": "jsonl", ".parquet": "parquet"}
_IGNORED_IN_DIRS = {".md", ".lock", ".py", ".yaml", ".yml", ".sh"}


class DataError(ValueError):
    """Bad input data. The message is one line naming the file (and record, where there is one)."""

    def __init__(self, where: str | Path, cause: str):
        super().__init__(f"{where}: {cause}".replace("\n", " "))


def check_split(split: str, available: Sequence[str] = SPLITS) -> str:
    if split not in available:
        raise ValueError(f"split must be one of {list(available)}, got {split!r}")
    return split


def check_kind(kind: str, available: Sequence[str], task: str) -> str:
    if kind not in available:
        raise ValueError(f"data={task} supports kind {list(available)}, got {kind!r}")
    return kind


def expand_paths(spec: str | Path | Sequence[str | Path], key: str = "data.path") -> list[Path]:
    """Files named by ``spec`` (file, glob, directory or a list of them), in a stable order.

    Raises DataError for a pattern or file that matches nothing.
    """
    specs = [spec] if isinstance(spec, (str, Path)) else list(spec)
    if not specs:
        raise DataError(key, "empty list of paths")
    files: list[Path] = []
    for item in specs:
        item = str(Path(str(item)).expanduser())
        if glob.has_magic(item):
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
            if not matches:
                raise DataError(item, f"no file matches this pattern ({key})")
            files += matches
        elif Path(item).is_dir():
            matches = sorted(p for p in Path(item).rglob("*") if p.is_file()
                             and not p.name.startswith(".") and p.suffix not in _IGNORED_IN_DIRS)
            if not matches:
                raise DataError(item, f"directory holds no data files ({key})")
            files += matches
        elif Path(item).is_file():
            files.append(Path(item))
        else:
            raise DataError(item, f"no such file ({key})")
    return files


def file_format(path: Path) -> str:
    """``json``, ``jsonl``, ``parquet`` or ``text``, from the suffix (``.gz`` stripped)."""
    name = path.name[:-3] if path.name.endswith(".gz") else path.name
    return RECORD_FORMATS.get(Path(name).suffix.lower(), "text")


def fingerprint(files: Sequence[Path]) -> list[str]:
    """One string per file that changes when the file does (for cache keys)."""
    out = []
    for f in files:
        st = f.stat()
        out.append(f"{f.resolve()}|{st.st_size}|{st.st_mtime_ns}")
    return out


def stable_fraction(text: str) -> float:
    """A deterministic number in [0, 1) from ``text`` (held-out slices that survive reordering)."""
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def stable_hash(text: str) -> int:
    return zlib.crc32(text.encode("utf-8"))


def _open(path: Path):
    if path.name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, "rt", encoding="utf-8")


def _io_error(path: Path, err: Exception) -> DataError:
    if isinstance(err, (EOFError, gzip.BadGzipFile, zlib.error)):
        return DataError(path, f"corrupt or truncated gzip file ({err})")
    if isinstance(err, UnicodeDecodeError):
        return DataError(path, f"not UTF-8 text ({err.reason} at byte {err.start})")
    return DataError(path, f"cannot read file ({type(err).__name__}: {err})")


def read_text(path: Path) -> str:
    """The whole file as text (gzip-aware); DataError if unreadable or empty."""
    try:
        with _open(path) as f:
            text = f.read()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise _io_error(path, err) from err
    if not text.strip():
        raise DataError(path, "empty file")
    return text


def parse_json(path: Path, text: str) -> Any:
    """Parse one JSON document; DataError names the line and column of the problem."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        if err.pos >= len(text.rstrip()) or "Unterminated" in err.msg:
            cause = f"truncated JSON (ends inside a value at line {err.lineno}, column {err.colno})"
        else:
            cause = f"invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        raise DataError(path, cause) from err


def read_json(path: Path) -> Any:
    return parse_json(path, read_text(path))


def _json_lines(path: Path, lines) -> Iterator[tuple[str, Any]]:
    n = 0
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: line {lineno}", f"invalid JSON: {err.msg}") from err
        n += 1
        yield f"line {lineno}", record
    if n == 0:
        raise DataError(path, "empty file (no records)")


def _iter_json_lines(path: Path) -> Iterator[tuple[str, Any]]:
    try:
        with _open(path) as f:
            yield from _json_lines(path, f)
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise _io_error(path, err) from err


def _iter_parquet(path: Path, columns: Sequence[str] | None) -> Iterator[tuple[str, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several unrelated types for a bad file
        raise DataError(path, f"not a readable Parquet file ({type(err).__name__}: {err})") from err
    names = pf.schema_arrow.names
    missing = [c for c in columns or () if c not in names]
    if missing:
        raise DataError(path, f"no column {missing[0]!r} (columns: {', '.join(names)})")
    if pf.metadata.num_rows == 0:
        raise DataError(path, "empty file (0 rows)")
    row = 0
    for batch in pf.iter_batches(columns=list(columns) if columns else None, batch_size=4096):
        for record in batch.to_pylist():
            yield f"row {row}", record
            row += 1


def iter_records(path: Path, columns: Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` for each record of a JSON / JSON-lines / Parquet file.

    ``where`` names the record inside the file (``line 12``, ``row 3``, ``record 5``). A ``.json``
    file may hold a list of records or be JSON lines. Parquet reads only ``columns`` (if given).
    """
    fmt = file_format(path)
    if fmt == "parquet":
        yield from _iter_parquet(path, columns)
        return
    if fmt == "json":  # a list of records, one record, or JSON lines saved as .json
        text = read_text(path)
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as err:
            if err.msg != "Extra data":
                parse_json(path, text)  # raises the located DataError
            yield from _json_lines(path, text.splitlines())
            return
        records = doc if isinstance(doc, list) else [doc]
        if not records:
            raise DataError(path, "empty file (an empty JSON list)")
        for i, record in enumerate(records):
            yield f"record {i}", record
        return
    yield from _iter_json_lines(path)


def iter_text_blocks(path: Path, block_chars: int = 16_384) -> Iterator[str]:
    """A plain-text file in blocks of about ``block_chars`` characters, cut at line ends."""
    block: list[str] = []
    size = 0
    seen = False
    try:
        with _open(path) as f:
            for line in f:
                block.append(line)
                size += len(line)
                if size >= block_chars:
                    text = "".join(block)
                    if text.strip():
                        seen = True
                        yield text
                    block, size = [], 0
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise _io_error(path, err) from err
    text = "".join(block)
    if text.strip():
        seen = True
        yield text
    if not seen:
        raise DataError(path, "empty file")


def record_field(record: Any, field: str, path: Path, where: str) -> str:
    """``record[field]`` as a string, or a DataError naming the file and record."""
    if not isinstance(record, dict):
        raise DataError(f"{path}: {where}", f"expected a JSON object, got {type(record).__name__}")
    if field not in record:
        keys = ", ".join(list(record)[:8]) or "none"
        raise DataError(f"{path}: {where}", f"record has no {field!r} field (keys: {keys})")
    value = record[field]
    if not isinstance(value, str):
        raise DataError(f"{path}: {where}", f"field {field!r} is {type(value).__name__}, not text")
    return value
