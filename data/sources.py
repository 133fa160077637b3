"""Where documents come from: the built-in corpus, local files, or Hugging Face `datasets`.

Each document has a `key` that is the same on every machine: its file's path relative to the
standard library or site-packages, or relative to the directory a `paths` entry names (the
directory of a file entry, the part of a glob before its first wildcard; of those entries
that match a file, the one whose directory is highest), or the dataset name as configured; plus
a line, block or row number. The train/validation split hashes that key. `max_bytes` caps how much is read, and the
source report always states what was found and what was taken.

The built-in corpus is every `.py` file of the running interpreter's standard library and of its
site-packages directories. Package directories nested in the standard library directory belong
to other environments (a venv does not see the base interpreter's site-packages) and are not
part of it.
"""

import dataclasses
import glob
import hashlib
import json
import os
import pathlib
import re
import site
import sys
import sysconfig
from collections.abc import Iterator

import numpy as np

FORMATS = ("auto", "text", "jsonl", "parquet")
TEXT_UNITS = ("file", "paragraph")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_REPLACEMENT = "\ufffd"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


@dataclasses.dataclass(frozen=True)
class Document:
    key: str
    text: str


@dataclasses.dataclass(frozen=True)
class SourceFile:
    key: str
    path: pathlib.Path
    size: int
    mtime_ns: int

    @classmethod
    def at(cls, key: str, path: pathlib.Path) -> "SourceFile":
        stat = path.stat()
        return cls(key, path, stat.st_size, stat.st_mtime_ns)


@dataclasses.dataclass
class SourceReport:
    kind: str
    files_found: int = 0
    bytes_found: int = 0
    files_taken: int = 0
    bytes_taken: int = 0
    max_bytes: int = 0
    undecodable_files: list[str] = dataclasses.field(default_factory=list)
    replaced_byte_sequences: int = 0

    def summary(self) -> str:
        files = f"{self.files_taken:,} of {self.files_found:,} files"
        size = f"{self.bytes_taken:,} of {self.bytes_found:,} bytes"
        limit = f"limit max_bytes={self.max_bytes:,}" if self.max_bytes else "no limit"
        return f"{self.kind}: {files}, {size} ({limit})"


def builtin_roots() -> list[tuple[str, pathlib.Path]]:
    """(label, directory): the standard library and this interpreter's site-packages."""
    candidates = site.getsitepackages()
    if site.ENABLE_USER_SITE:
        candidates.append(site.getusersitepackages())
    # Resolved, because venvs often list the same directory as both lib/ and lib64/.
    sites = list(dict.fromkeys(pathlib.Path(p).resolve() for p in candidates if os.path.isdir(p)))
    labels = ["site-packages"] + [f"site-packages-{i}" for i in range(2, len(sites) + 1)]
    stdlib = pathlib.Path(sysconfig.get_paths()["stdlib"])
    return [("stdlib", stdlib)] + list(zip(labels, sites))


def _python_files(label: str, root: pathlib.Path) -> Iterator[SourceFile]:
    for directory, subdirectories, names in os.walk(root):
        if label == "stdlib":
            # This interpreter's package directories are roots of their own (see the docstring).
            subdirectories[:] = [
                d for d in subdirectories if d not in ("site-packages", "dist-packages")
            ]
        subdirectories.sort()
        for name in sorted(n for n in names if n.endswith(".py")):
            path = pathlib.Path(directory, name)
            yield SourceFile.at(f"{label}/{path.relative_to(root).as_posix()}", path)


def stable_fraction(key: str, purpose: str = "split") -> float:
    """A number in [0, 1) from a hash of the key: the same on every machine and Python process.

    Each purpose hashes differently: were the reading order under a byte limit the split hash,
    the limit would always keep every validation document and cut only training ones.
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8, person=purpose.encode("utf-8"))
    return int.from_bytes(digest.digest(), "big") / 2**64


def _entry_root(pattern: str) -> pathlib.Path:
    """The directory keys are relative to: above a named file or directory, or a glob's base."""
    parts = pathlib.Path(pattern).parts
    wildcard = next((i for i, part in enumerate(parts) if any(c in part for c in "*?[")), None)
    if wildcard is None:
        return pathlib.Path(pattern).parent
    return pathlib.Path(*parts[:wildcard])


def _listed_files(patterns) -> list[SourceFile]:
    if not patterns:
        raise ValueError("source='files' needs `paths`: files, directories or glob patterns")
    files = {}
    for pattern in map(str, patterns):
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise ValueError(f"paths entry {pattern!r} matched no file or directory")
        root = _entry_root(pattern)
        for match in map(pathlib.Path, matches):
            found = sorted(p for p in match.rglob("*") if p.is_file()) if match.is_dir() else [match]
            for path in found:
                key = path.relative_to(root).as_posix()
                # A file several entries match is keyed from the highest of their directories,
                # so that its key, and with it the split, does not depend on their order.
                if path not in files or (len(key), key) > (len(files[path].key), files[path].key):
                    files[path] = SourceFile.at(key, path)
    return list(files.values())


def list_files(cfg) -> list[SourceFile]:
    """The files of the source in reading order (none for a dataset on the Hugging Face hub)."""
    if cfg.source == "builtin":
        files = [f for label, root in builtin_roots() for f in _python_files(label, root)]
        # In hash order rather than by name, so that a byte limit takes a spread of packages.
        return sorted(files, key=lambda f: stable_fraction(f.key, purpose="order"))
    if cfg.source == "files":
        return _listed_files(cfg.paths)
    if cfg.source == "hf":
        root = pathlib.Path(_hf_location(cfg))
        if not root.is_dir():
            return []
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        return [SourceFile.at(p.relative_to(root).as_posix(), p) for p in paths]
    raise ValueError(f"source={cfg.source!r} is not one of 'builtin', 'files', 'hf'")


def _within_limit(files: list[SourceFile], max_bytes: int) -> list[SourceFile]:
    """The leading files whose sizes add up to at most max_bytes (all of them if it is 0)."""
    taken, total = [], 0
    for f in files:
        if max_bytes and total + f.size > max_bytes:
            break
        taken.append(f)
        total += f.size
    return taken


def fingerprint(cfg, taken: list[SourceFile] | None = None) -> str:
    """Changes whenever a file that would be read changes (name, size or modification time).
    `taken`: the files `plan` takes, when they are at hand (listing them takes a second for the
    built-in corpus)."""
    files = taken
    if cfg.source == "hf":
        files = list_files(cfg)
    elif taken is None:
        files = _within_limit(list_files(cfg), cfg.max_bytes)
    listing = [(f.key, f.size, f.mtime_ns) for f in files]
    extra = [_hf_location(cfg), cfg.hf_split] if cfg.source == "hf" else [sys.version]
    return hashlib.sha256(json.dumps([listing, extra]).encode("utf-8")).hexdigest()


def _decode(path: pathlib.Path, report: SourceReport) -> str:
    """UTF-8 text of the file; undecodable bytes become U+FFFD and are counted in the report."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        report.undecodable_files.append(str(path))
        already_there = raw.count(_REPLACEMENT.encode("utf-8"))
        report.replaced_byte_sequences += text.count(_REPLACEMENT) - already_there
        return text


def _file_format(path: pathlib.Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    by_suffix = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
    return by_suffix.get(path.suffix.lower(), "text")


def _text_documents(f: SourceFile, text: str, unit: str) -> Iterator[Document]:
    if unit == "file":
        yield Document(f.key, text)
        return
    for number, block in enumerate(_PARAGRAPH_BREAK.split(text)):
        if block.strip():
            yield Document(f"{f.key}#{number}", block.strip("\r\n"))  # CRLF files leave "\r" at a break


def jsonl_records(path: pathlib.Path, text: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line of a JSONL file's text; invalid JSON
    is an error naming the file and line."""
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{path}:{number}: invalid JSON ({error.msg} at column {error.colno})"
            ) from None


def _jsonl_documents(f: SourceFile, text: str, field: str) -> Iterator[Document]:
    for number, record in jsonl_records(f.path, text):
        where = f"{f.path}:{number}"
        if not isinstance(record, dict) or field not in record:
            found = ", ".join(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(f"{where}: no field {field!r} (found: {found}); set text_field")
        yield _checked(where, field, record[field], f"{f.key}:{number}")


def _checked(where: str, field: str, value, key: str) -> Document:
    """A record's text as a document. A lone surrogate (JSON's escape of half an emoji, as cut
    scraped text holds) becomes U+FFFD: it has no UTF-8 encoding, and every later step encodes."""
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    return Document(key, _LONE_SURROGATE.sub(_REPLACEMENT, value))


def _parquet_documents(f: SourceFile, field: str) -> Iterator[Document]:
    import pyarrow.parquet as pq  # about a second to import; only Parquet sources need it

    table = pq.ParquetFile(f.path)
    columns = table.schema_arrow.names
    if field not in columns:
        found = ", ".join(columns)
        raise ValueError(f"{f.path}: no column {field!r} (found: {found}); set text_field")
    values = table.read(columns=[field]).column(field).to_pylist()
    for row, value in enumerate(values):
        yield _checked(f"{f.path}: row {row}", field, value, f"{f.key}[{row}]")


def _hf_location(cfg) -> str:
    if len(cfg.paths) != 1:
        raise ValueError("source='hf' needs one `paths` entry: a saved dataset directory or hub name")
    return str(cfg.paths[0])


def load_hf_dataset(location: str, split: str, split_key: str = "hf_split"):
    """One split of a saved dataset directory or hub dataset; `split_key` is the setting the
    error for a missing split names."""
    try:
        import datasets  # an optional dependency (the project's test extra)
    except ImportError:
        raise ValueError(
            f"{location}: reading a Hugging Face dataset needs the `datasets` package "
            "(pip install datasets)"
        ) from None
    if os.path.isdir(location):
        try:
            dataset = datasets.load_from_disk(location)
        except FileNotFoundError as error:  # a directory, but no saved dataset
            raise ValueError(f"{location}: {error}") from None
    else:
        dataset = datasets.load_dataset(location, split=split)
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            found = ", ".join(dataset)
            raise ValueError(f"{location}: no split {split!r} (found: {found}); set {split_key}")
        dataset = dataset[split]
    return dataset


@dataclasses.dataclass(frozen=True)
class RowRange:
    """Rows [start, stop) of the Hugging Face dataset: the share of one preparation task."""

    start: int
    stop: int


def _hf_row_bytes(cfg) -> np.ndarray:
    """UTF-8 bytes of each row's text, computed by pyarrow without decoding."""
    import pyarrow.compute as pc

    location = _hf_location(cfg)
    dataset = load_hf_dataset(location, cfg.hf_split)
    if cfg.text_field not in dataset.column_names:
        found = ", ".join(dataset.column_names)
        raise ValueError(f"{location}: no column {cfg.text_field!r} (found: {found}); set text_field")
    lengths = pc.binary_length(dataset.with_format("arrow")[cfg.text_field])
    return pc.fill_null(lengths, 0).to_numpy(zero_copy_only=False)


def _hf_documents(cfg, rows: RowRange, batch_rows: int = 1000) -> Iterator[Document]:
    location = _hf_location(cfg)
    dataset = load_hf_dataset(location, cfg.hf_split)
    for begin in range(rows.start, rows.stop, batch_rows):
        values = dataset[begin : min(begin + batch_rows, rows.stop)][cfg.text_field]
        for row, value in enumerate(values, start=begin):
            yield _checked(f"{location}: row {row}", cfg.text_field, value, f"{location}[{row}]")


def _plan_hf(cfg, tasks: int, report: SourceReport) -> list[RowRange]:
    """The leading rows within max_bytes, cut into `tasks` ranges; a dataset counts as one file
    in the report."""
    sizes = _hf_row_bytes(cfg)
    ends = np.cumsum(sizes, dtype=np.int64)
    rows = int(np.searchsorted(ends, cfg.max_bytes, side="right")) if cfg.max_bytes else sizes.size
    report.bytes_found = int(ends[-1]) if sizes.size else 0
    report.bytes_taken = int(ends[rows - 1]) if rows else 0
    report.files_found = report.files_taken = 1
    return [RowRange(rows * i // tasks, rows * (i + 1) // tasks) for i in range(tasks)]


def plan(cfg, tasks: int) -> tuple[list, SourceReport]:
    """(what is read, in reading order: the files within cfg.max_bytes, or for a dataset one
    row range per task; the report of what was found and taken)."""
    if cfg.format not in FORMATS:
        raise ValueError(f"format={cfg.format!r} is not one of {FORMATS}")
    if cfg.text_unit not in TEXT_UNITS:
        raise ValueError(f"text_unit={cfg.text_unit!r} is not one of {TEXT_UNITS}")
    report = SourceReport(kind=cfg.source, max_bytes=cfg.max_bytes)
    if cfg.source == "hf":
        return _plan_hf(cfg, tasks, report), report
    files = list_files(cfg)
    taken = _within_limit(files, cfg.max_bytes)
    report.files_found, report.bytes_found = len(files), sum(f.size for f in files)
    report.files_taken, report.bytes_taken = len(taken), sum(f.size for f in taken)
    return taken, report


def unit_record(unit: "SourceFile | RowRange") -> dict:
    """A unit of `plan` as JSON-ready values (`unit_from_record` reverses it)."""
    return {k: str(v) if isinstance(v, pathlib.Path) else v for k, v in dataclasses.asdict(unit).items()}


def unit_from_record(record: dict) -> "SourceFile | RowRange":
    if "start" in record:
        return RowRange(**record)
    return SourceFile(**{**record, "path": pathlib.Path(record["path"])})


def read(cfg, unit: "SourceFile | RowRange", report: SourceReport) -> Iterator[Document]:
    """The documents of one file or row range of `plan`; undecodable bytes are counted in
    `report`."""
    if isinstance(unit, RowRange):
        yield from _hf_documents(cfg, unit)
        return
    fmt = "text" if cfg.source == "builtin" else _file_format(unit.path, cfg.format)
    if fmt == "parquet":
        yield from _parquet_documents(unit, cfg.text_field)
        return
    text = _decode(unit.path, report)
    if fmt == "jsonl":
        yield from _jsonl_documents(unit, text, cfg.text_field)
    else:
        yield from _text_documents(unit, text, "file" if cfg.source == "builtin" else cfg.text_unit)


def read_documents(cfg) -> tuple[list[Document], SourceReport]:
    """Every document of the configured source, within cfg.max_bytes, in memory."""
    units, report = plan(cfg, tasks=1)
    return [document for unit in units for document in read(cfg, unit, report)], report
