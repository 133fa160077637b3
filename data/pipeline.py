"""Data preparation: read, clean, deduplicate, split, train (or load) a tokenizer, tokenize.

    cfg = pipeline.default_config()
    corpus = pipeline.prepare(cfg)        # prints the report; a second call reuses the cache
    it = pipeline.train_iterator(corpus, seq_len=L, batch_size=B, seed=0)
    for batch in pipeline.eval_batches(corpus, seq_len=L, batch_size=B): ...

The cache directory is named by a hash of everything the tokens depend on: the source files
(names, sizes, modification times), the cleaning, dedup, split and tokenizer settings. It lies
under `data.cache_dir`, by default `$LMX_DATA_CACHE`, else `$XDG_CACHE_HOME/lmx/data` (that is,
`~/.cache/lmx/data`), whatever directory a command runs from.
"""

import collections
import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import pathlib
import shutil
import signal
import socket
import sys
import threading
import time

import ml_collections
import numpy as np
from etils import epath

from data import dedup, parallel, preprocess, sources, token_cache
from data import tokenizer as tokenizer_lib
from data.packing import eval_batches, train_iterator

__all__ = ["Corpus", "default_config", "eval_batches", "prepare", "train_iterator"]

_CACHE_FORMAT = 1
# Settings that change how the work is done, not what it produces.
_NOT_IN_CACHE_KEY = ("cache_dir", "processes", "worker_count")


def default_config() -> ml_collections.ConfigDict:
    """Defaults sized for `make quickstart` on a 2-core CPU; each field is explained in place."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "builtin"  # 'builtin' (Python sources on this machine) | 'files' | 'hf'
    cfg.paths = ()  # files: files, directories, globs; hf: a saved dataset directory or hub name
    cfg.format = "auto"  # files: 'auto' (by extension) | 'text' | 'jsonl' | 'parquet'
    cfg.text_field = "text"  # JSONL key / Parquet or datasets column holding the text
    cfg.text_unit = "file"  # text files: one document per 'file' or per blank-line 'paragraph'
    cfg.hf_split = "train"
    # Bytes read at most (0: everything); the report always states it. 40 MB of the built-in
    # corpus prepares in about 35 s on 2 cores and gives ~10M tokens, more than a CPU run uses.
    cfg.max_bytes = 40_000_000
    cfg.cleaning = ml_collections.ConfigDict(
        dict(
            normalization="NFC",  # unicodedata form; '' keeps the text as read
            scrub_pii=True,
            min_chars=200,
            max_chars=1_000_000,
            # Gopher's prose values are in the comments; these are loosened for source code,
            # where comments (#) and repeated lines and phrases are normal.
            min_alpha_fraction=0.5,  # alphabetic / non-space characters
            max_symbol_word_ratio=0.25,  # Gopher: 0.1
            max_duplicate_line_fraction=0.5,  # Gopher: 0.3
            max_top_ngram_fraction=((2, 0.20), (3, 0.18), (4, 0.16)),  # Gopher's values
            # Gopher: 0.15, 0.14, 0.13, 0.12, 0.11, 0.10 for n = 5..10.
            max_duplicate_ngram_fraction=(
                (5, 0.60), (6, 0.58), (7, 0.56), (8, 0.54), (9, 0.52), (10, 0.50)
            ),
        )
    )
    cfg.dedup = ml_collections.ConfigDict(
        dict(exact=True, near=True, threshold=0.8, num_perm=128, ngram=5, seed=0)
    )
    cfg.tokenizer = ml_collections.ConfigDict(
        dict(
            path="",  # a SentencePiece .model to load instead of training one
            vocab_size=8192,
            model_type="bpe",  # 'bpe' | 'unigram' (unigram trains about 15x slower)
            sample_bytes=4_000_000,  # training sample drawn from the train split
            character_coverage=0.9995,  # rarer characters are spelled as UTF-8 bytes
            split_digits=False,
        )
    )
    cfg.val_fraction = 0.01  # of documents, chosen by a hash of each document's key
    cfg.seed = 0  # tokenizer sample
    cfg.cache_dir = default_cache_dir()
    cfg.processes = 0  # worker processes for preparation; 0: one per core
    cfg.worker_count = 0  # grain worker processes for the training iterator; 0: in-process
    return cfg


def default_cache_dir() -> str:
    if os.environ.get("LMX_DATA_CACHE"):
        return os.environ["LMX_DATA_CACHE"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return str(pathlib.Path(cache_home) / "lmx" / "data")


def _validate(cfg) -> None:
    if cfg.source not in ("builtin", "files", "hf"):
        raise ValueError(f"data.source={cfg.source!r} is not one of 'builtin', 'files', 'hf'")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if "://" in str(cfg.cache_dir):
        raise ValueError(
            f"data.cache_dir={cfg.cache_dir!r}: the token cache is memory-mapped, so it must be a local "
            "(or mounted) directory; each host of a pod builds the same cache"
        )
    if cfg.max_bytes < 0:
        raise ValueError(f"data.max_bytes={cfg.max_bytes} must be >= 0 (0: no limit)")
    if cfg.tokenizer.model_type not in ("bpe", "unigram"):
        model_type = cfg.tokenizer.model_type
        raise ValueError(f"data.tokenizer.model_type={model_type!r}: use 'bpe' or 'unigram'")
    if not 0 < cfg.dedup.threshold <= 1:
        raise ValueError(f"data.dedup.threshold={cfg.dedup.threshold} must be in (0, 1]")
    if cfg.tokenizer.path:
        try:
            tokenizer_lib.Tokenizer.load(cfg.tokenizer.path)
        except (OSError, ValueError) as error:
            raise ValueError(f"data.tokenizer.path={cfg.tokenizer.path!r}: {error}") from None


@dataclasses.dataclass(frozen=True)
class Corpus:
    """A prepared corpus: tokenizer, token cache directory and the preparation report."""

    directory: pathlib.Path
    tokenizer: tokenizer_lib.Tokenizer
    report: dict
    config: ml_collections.ConfigDict

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes per token on the validation split (BOS and EOS not counted)."""
        return self.report["bytes_per_token"]

    @property
    def token_dtype(self) -> np.dtype:
        return token_cache.token_dtype(self.tokenizer.vocab_size)

    def split(self, name: str) -> token_cache.TokenizedSplit:
        """'train' or 'val'."""
        return token_cache.TokenizedSplit(self.directory, name, self.token_dtype)


def cache_key(cfg) -> str:
    """A hash of everything the cached tokens depend on: settings, source files, tokenizer."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_CACHE_KEY}
    tokenizer_model = epath.Path(cfg.tokenizer.path).read_bytes() if cfg.tokenizer.path else b""
    parts = [
        _CACHE_FORMAT,
        settings,
        sources.fingerprint(cfg),
        hashlib.sha256(tokenizer_model).hexdigest(),
    ]
    encoded = json.dumps(parts, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:20]


def prepare(cfg=None, verbose: bool = True) -> Corpus:
    """Builds (or reuses) the token cache for `cfg` and returns the corpus; prints the report."""
    cfg = default_config() if cfg is None else cfg
    _validate(cfg)
    directory = pathlib.Path(cfg.cache_dir).expanduser() / cache_key(cfg)
    reused = (directory / "report.json").exists()
    if not reused:
        _build(cfg, directory)
    corpus = Corpus(
        directory=directory,
        tokenizer=tokenizer_lib.Tokenizer.load(directory / "tokenizer.model"),
        report=json.loads((directory / "report.json").read_text()),
        config=cfg,
    )
    if verbose:
        print(format_report(corpus.report, directory, reused))
    return corpus


class _Stopwatch:
    """Seconds per named step, for the report."""

    def __init__(self):
        self.seconds = {}
        self._start = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = round(now - self._start, 2)
        self._start = now


def _build(cfg, directory: pathlib.Path) -> None:
    """Writes the cache into a staging directory, renamed into place once complete."""
    _remove_abandoned_staging(directory)
    staging = directory.with_name(f"{directory.name}{_staging_suffix(socket.gethostname())}{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with _sigterm_raises():
            report = _build_into(cfg, staging)
        (staging / "report.json").write_text(json.dumps(report, indent=1))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        staging.rename(directory)
    except OSError:
        shutil.rmtree(staging)
        if not (directory / "report.json").exists():
            raise
        # else another process finished the same cache first; its files are the same.


def _staging_suffix(host: str) -> str:
    return f".tmp-{host}-"


def _remove_abandoned_staging(directory: pathlib.Path) -> None:
    """Staging directories of processes of this host that no longer run (killed with -9)."""
    prefix = directory.name + _staging_suffix(socket.gethostname())
    for staging in directory.parent.glob(f"{prefix}*"):
        pid = staging.name.removeprefix(prefix)
        if pid.isdigit() and not parallel.process_running(int(pid)):
            shutil.rmtree(staging, ignore_errors=True)


@contextlib.contextmanager
def _sigterm_raises():
    """SIGTERM during preparation exits through Python (status 143), so that the staging
    directory is removed; its default action would end the process on the spot."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _build_into(cfg, staging: pathlib.Path) -> dict:
    """Reads, cleans, deduplicates, splits and tokenizes; returns the report."""
    stopwatch = _Stopwatch()
    processes = parallel.process_count(cfg.processes)
    with parallel.BatchMapper(processes) as mapper:
        documents, source_report = sources.read_documents(cfg)
        if not documents:
            raise ValueError(f"empty corpus: no documents were read ({source_report.summary()})")
        stopwatch.lap("read")
        kept, filtering = _clean_and_deduplicate(mapper, cfg, documents, stopwatch)
        splits = _split(cfg, kept)
        tokenizer, sample_bytes = _train_or_load_tokenizer(cfg, splits["train"], processes)
        stopwatch.lap("tokenizer")
        tokenizer.save(staging / "tokenizer.model")
        split_reports = {
            name: _tokenize_split(mapper, tokenizer, staging, name, texts)
            for name, texts in splits.items()
        }
        stopwatch.lap("tokenize")

    val = split_reports["val"]
    return {
        "source": dataclasses.asdict(source_report),
        "documents_in": len(documents),
        "bytes_in": sum(len(d.text.encode("utf-8")) for d in documents),
        **filtering,
        "documents_out": len(kept),
        "bytes_out": sum(s["bytes"] for s in split_reports.values()),
        "splits": split_reports,
        "tokenizer": {
            "vocab_size": tokenizer.vocab_size,
            "trained_on_bytes": sample_bytes,
            "loaded_from": cfg.tokenizer.path,
        },
        # BOS and EOS carry no text, so they are left out of the ratio.
        "bytes_per_token": val["bytes"] / max(val["tokens"] - 2 * val["documents"], 1),
        "processes": processes,
        "seconds": stopwatch.seconds,
    }


def _clean_and_deduplicate(mapper, cfg, documents, stopwatch) -> tuple[list, dict]:
    """(cleaned documents that pass every filter and copy no earlier one, counts for the report)."""
    process = functools.partial(
        preprocess.clean_and_fingerprint, cleaning_cfg=cfg.cleaning, dedup_cfg=cfg.dedup
    )
    processed = mapper.map(process, [d.text for d in documents])
    removed = collections.Counter(p.removed_by for p in processed if p.removed_by)
    pii = sum((p.pii_replaced for p in processed), collections.Counter())
    stopwatch.lap("clean")

    kept = [i for i, p in enumerate(processed) if p.text is not None]
    exact_duplicates = near_duplicates = 0
    if cfg.dedup.exact:
        first_seen = {}
        for i in kept:
            first_seen.setdefault(processed[i].exact_key, i)
        exact_duplicates = len(kept) - len(first_seen)
        kept = sorted(first_seen.values())
    if cfg.dedup.near:
        signatures = [processed[i].signature for i in kept]
        duplicate_of = dedup.near_duplicates(signatures, cfg.dedup.threshold)
        near_duplicates = sum(d is not None for d in duplicate_of)
        kept = [i for i, d in zip(kept, duplicate_of) if d is None]
    if not kept:
        raise ValueError(
            f"nothing left after cleaning and deduplication of {len(documents)} documents: "
            f"removed by filter {dict(removed)}, exact duplicates {exact_duplicates}, "
            f"near duplicates {near_duplicates}; relax the cfg.cleaning thresholds"
        )
    stopwatch.lap("dedup")
    filtering = {
        "removed_by_filter": dict(sorted(removed.items())),
        "pii_replaced": dict(sorted(pii.items())),
        "exact_duplicates": exact_duplicates,
        "near_duplicates": near_duplicates,
    }
    return [sources.Document(documents[i].key, processed[i].text) for i in kept], filtering


def _split(cfg, documents: list[sources.Document]) -> dict[str, list[str]]:
    """Texts of the train and validation splits, chosen by a hash of each document's key."""
    is_val = [sources.stable_fraction(d.key) < cfg.val_fraction for d in documents]
    splits = {
        "train": [d.text for d, val in zip(documents, is_val) if not val],
        "val": [d.text for d, val in zip(documents, is_val) if val],
    }
    for name, texts in splits.items():
        if not texts:
            raise ValueError(
                f"the {name} split is empty: {len(documents)} documents, "
                f"val_fraction={cfg.val_fraction}; add documents or change val_fraction"
            )
    return splits


def _train_or_load_tokenizer(cfg, train_texts: list[str], processes: int):
    """(tokenizer, bytes it was trained on: 0 when loaded from cfg.tokenizer.path)."""
    if cfg.tokenizer.path:
        return tokenizer_lib.Tokenizer.load(cfg.tokenizer.path), 0
    sample = tokenizer_lib.training_sample(train_texts, cfg.tokenizer.sample_bytes, cfg.seed)
    trained = tokenizer_lib.train(sample, cfg.tokenizer, num_threads=processes)
    return trained, sum(len(piece.encode("utf-8")) for piece in sample)


def _tokenize_split(mapper, tokenizer, directory: pathlib.Path, name: str, texts) -> dict:
    """Writes the split's token files; returns its documents, bytes and tokens."""
    encode = functools.partial(preprocess.encode_documents, model_proto=tokenizer.model_proto)
    encoded = mapper.map(encode, texts)
    token_cache.write_split(directory, name, encoded, token_cache.token_dtype(tokenizer.vocab_size))
    return {
        "documents": len(texts),
        "bytes": sum(len(t.encode("utf-8")) for t in texts),
        "tokens": sum(len(e) for e in encoded),
    }


def format_report(report: dict, directory: pathlib.Path, reused: bool) -> str:
    source = sources.SourceReport(**report["source"])
    lines = [f"data: {source.summary()}"]
    if source.undecodable_files:
        examples = ", ".join(source.undecodable_files[:3])
        lines.append(
            f"  undecodable UTF-8: {len(source.undecodable_files)} files ({examples}...), "
            f"{source.replaced_byte_sequences} byte sequences replaced by U+FFFD"
        )
    lines += [
        f"  in: {report['documents_in']:,} documents, {report['bytes_in']:,} bytes",
        f"  removed by filter: {report['removed_by_filter'] or 'none'}",
        f"  PII replaced: {report['pii_replaced'] or 'none'}",
        f"  duplicates removed: {report['exact_duplicates']:,} exact, "
        f"{report['near_duplicates']:,} near",
        f"  out: {report['documents_out']:,} documents, {report['bytes_out']:,} bytes",
    ]
    for name, split in report["splits"].items():
        lines.append(f"  {name}: {split['documents']:,} documents, {split['tokens']:,} tokens")
    lines.append(
        f"  tokenizer: vocab {report['tokenizer']['vocab_size']}, "
        f"{report['bytes_per_token']:.2f} bytes/token on val"
    )
    prepared = f"prepared in {sum(report['seconds'].values()):.1f}s: {report['seconds']}"
    lines.append(f"  cache: {directory} ({'reused; first ' if reused else ''}{prepared})")
    return "\n".join(lines)
