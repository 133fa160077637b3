"""The data settings, the cache they name, and opening a prepared corpus.

    python -m data.prepare --config=experiments/quickstart.py      # prepares; prints the report
    corpus = pipeline.open_corpus(cfg.data)                         # what training reads
    it = pipeline.train_iterator(corpus, seq_len=L, batch_size=B, seed=0)
    for batch in pipeline.eval_batches(corpus, seq_len=L, batch_size=B): ...

The cache directory is named by a hash of everything the tokens depend on: the source files
(names, sizes, modification times), the cleaning, dedup, split, task and tokenizer settings. It
lies under `data.cache_dir`, by default `$LMX_DATA_CACHE`, else `$XDG_CACHE_HOME/lmx/data` (that
is, `~/.cache/lmx/data`), whatever directory a command runs from. A corpus is prepared once its
`manifest.json` exists: `data/prepare.py` writes it last.
"""

import dataclasses
import hashlib
import json
import os
import pathlib

import ml_collections
import numpy as np
from etils import epath

from data import sources, token_cache
from data import tokenizer as tokenizer_lib
from data.packing import eval_batches, train_iterator

__all__ = ["Corpus", "default_config", "eval_batches", "open_corpus", "train_iterator"]

# Part of the cache key: raised whenever the same settings would prepare different tokens, so
# that no cache written before is taken for the new output.
_CACHE_FORMAT = 4
MANIFEST = "manifest.json"
EXECUTORS = ("local", "ray", "slurm")
# Settings that change how the work is done, not what it produces.
_NOT_IN_CACHE_KEY = ("cache_dir", "executor", "workers", "slurm", "worker_count")


def default_config() -> ml_collections.ConfigDict:
    """Defaults sized for `make quickstart` on a 2-core CPU; each field is explained in place."""
    cfg = ml_collections.ConfigDict()
    cfg.source = "builtin"  # 'builtin' (Python sources on this machine) | 'files' | 'hf'
    cfg.paths = ()  # files: files, directories, globs; hf: a saved dataset directory or hub name
    cfg.format = "auto"  # files: 'auto' (by extension) | 'text' | 'jsonl' | 'parquet'
    cfg.text_field = "text"  # JSONL key / Parquet or datasets column holding the text
    cfg.text_unit = "file"  # text files: one document per 'file' or per blank-line 'paragraph'
    cfg.hf_split = "train"
    # Bytes read at most (0: everything); the report always states it.
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
            # Gopher: 0.15, 0.14, 0.13, 0.12, 0.11, 0.10 for n = 5..10, counting only repeats after
            # the first occurrence (`cleaning.duplicate_ngram_fraction` counts it too).
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
    cfg.cache_dir = default_cache_dir()
    # Preparation (python -m data.prepare) cuts each stage into `tasks` pieces: files are dealt
    # out to them in turn, and each writes one train and one val shard. Part of the cache key:
    # which copy of a duplicate is kept depends on it.
    cfg.tasks = 8
    cfg.executor = "local"  # 'local' | 'ray' (pip install -e ".[cluster]") | 'slurm'
    cfg.workers = 0  # local: tasks run at once; 0: one per core
    # slurm: passed to datatrove's SlurmPipelineExecutor for every stage.
    cfg.slurm = ml_collections.ConfigDict(
        dict(partition="", time="4:00:00", cpus_per_task=1, mem_per_cpu_gb=2.0)
    )
    cfg.worker_count = 0  # grain worker processes for the training iterator; 0: in-process
    return cfg


def default_cache_dir() -> str:
    if os.environ.get("LMX_DATA_CACHE"):
        return os.environ["LMX_DATA_CACHE"]
    cache_home = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return str(pathlib.Path(cache_home) / "lmx" / "data")


def validate(cfg) -> None:
    if cfg.source not in ("builtin", "files", "hf"):
        raise ValueError(f"data.source={cfg.source!r} is not one of 'builtin', 'files', 'hf'")
    if not 0 < cfg.val_fraction < 1:
        raise ValueError(f"data.val_fraction={cfg.val_fraction} must be in (0, 1)")
    if "://" in str(cfg.cache_dir):
        raise ValueError(
            f"data.cache_dir={cfg.cache_dir!r}: the token cache is memory-mapped, so it must be a local "
            "(or mounted) directory; on a pod, mount the bucket the cache was prepared in"
        )
    if cfg.executor not in EXECUTORS:
        raise ValueError(f"data.executor={cfg.executor!r} is not one of {EXECUTORS}")
    if cfg.tasks < 1:
        raise ValueError(f"data.tasks={cfg.tasks} must be at least 1")
    if cfg.max_bytes < 0:
        raise ValueError(f"data.max_bytes={cfg.max_bytes} must be >= 0 (0: no limit)")
    if cfg.tokenizer.sample_bytes <= 0:
        raise ValueError(f"data.tokenizer.sample_bytes={cfg.tokenizer.sample_bytes} must be positive")
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
    """A prepared corpus: its directory, manifest and tokenizer, and the settings that named it."""

    directory: pathlib.Path
    manifest: dict
    tokenizer: tokenizer_lib.Tokenizer
    config: ml_collections.ConfigDict | None

    @property
    def report(self) -> dict:
        return self.manifest["report"]

    @property
    def digest(self) -> str:
        """Of the tokenizer and every shard's bytes and counts: equal digests, equal data."""
        return self.manifest["digest"]

    @property
    def val_bytes(self) -> int:
        """UTF-8 bytes of the validation split's text."""
        return self.report["splits"]["val"]["bytes"]

    @property
    def token_dtype(self) -> np.dtype:
        return token_cache.token_dtype(self.tokenizer.vocab_size)

    def split(self, name: str) -> token_cache.TokenizedSplit:
        """'train' or 'val'."""
        return token_cache.TokenizedSplit(
            self.directory / "shards", self.manifest["splits"][name]["shards"], self.token_dtype
        )


def cache_key(cfg, taken: list | None = None) -> str:
    """A hash of everything the cached tokens depend on: settings, source files (`taken`: as
    `sources.plan` lists them, when at hand), tokenizer."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in _NOT_IN_CACHE_KEY}
    tokenizer_model = epath.Path(cfg.tokenizer.path).read_bytes() if cfg.tokenizer.path else b""
    parts = [
        _CACHE_FORMAT,
        settings,
        sources.fingerprint(cfg, taken),
        hashlib.sha256(tokenizer_model).hexdigest(),
    ]
    encoded = json.dumps(parts, sort_keys=True).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()[:20]


def cache_directory(cfg, taken: list | None = None) -> pathlib.Path:
    return pathlib.Path(cfg.cache_dir).expanduser() / cache_key(cfg, taken)


def open_corpus(cfg, directory: pathlib.Path | None = None) -> Corpus:
    """The corpus `python -m data.prepare` made for these settings (in `directory`, when the
    caller has named it already); an error if it has not finished."""
    validate(cfg)
    directory = directory or cache_directory(cfg)
    manifest = directory / MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(
            f"{manifest}: no prepared corpus for these data settings (cache key {directory.name}); "
            "run `python -m data.prepare --config=<the experiment file>` first (`make quickstart` "
            "does for the quickstart)"
        )
    return Corpus(
        directory=directory,
        manifest=json.loads(manifest.read_text()),
        tokenizer=tokenizer_lib.Tokenizer.load(directory / "tokenizer.model"),
        config=cfg,
    )


def format_report(corpus: Corpus, seconds: dict | None) -> str:
    """The report of a preparation; `seconds` per stage, or None when the cache was reused."""
    report = corpus.report
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
        lines.append(
            f"  {name}: {split['documents']:,} documents, {split['tokens']:,} tokens, {split['shards']} shards"
        )
    lines.append(
        f"  tokenizer: vocab {report['tokenizer']['vocab_size']}, "
        f"{report['bytes_per_token']:.2f} bytes/token on val"
    )
    done = "reused" if seconds is None else f"prepared in {sum(seconds.values()):.1f}s: {seconds}"
    lines.append(f"  cache: {corpus.directory} ({done}; {report['tasks']} tasks, digest {corpus.digest[:16]})")
    return "\n".join(lines)
