"""The project's datatrove steps: reading the sources, cleaning, the MinHash signatures and their
verified clusters, the tokenizer sample and training, tokenizing into shards, the manifest.

Each step works on one task (`rank` of `world_size`) and writes files named by the rank, first
under a `.partial` name that is replaced when the file is complete, so a task that is killed and
run again leaves no trace of its first try. Steps that count something for the data report
write it to `reports/<step>/<rank>.json`; `data/prepare.py` lays the directories out.

datatrove logs through loguru; importing this module (as every worker process does before it
runs a step) silences datatrove unless LMX_DATA_VERBOSE=1 (`python -m data.prepare --verbose`).
"""

import collections
import hashlib
import heapq
import json
import os
import pathlib
import socket
from collections.abc import Iterator

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.exact_dedup import ExactDedupConfig
from datatrove.pipeline.dedup.minhash import MinhashConfig, MinhashDedupSignature
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.hashing import HashConfig
from datatrove.utils.typeshelper import ExtensionHelperSD
from loguru import logger

from data import cleaning, dedup, sources, token_cache, words
from data import tokenizer as tokenizer_lib

if os.environ.get("LMX_DATA_VERBOSE") != "1":
    logger.disable("datatrove")

_ENCODE_BATCH = 64  # documents per SentencePiece call
# The hash functions datatrove's dedup stages use (its default, xxhash, is not installed).
EXACT_HASH = HashConfig(precision=64, hash_fc="sha1")
MINHASH_HASH = HashConfig(precision=32, hash_fc="sha1")  # MinHasher's values are 32-bit


class Layout:
    """Where a preparation puts its files, under the cache directory named by the cache key:
    `shards/`, `tokenizer.model` and `manifest.json` are the prepared corpus; `work/` holds the
    stages' intermediate files, reports and datatrove's logging directories (completion files,
    logs, stats)."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        self.work = self.directory / "work"
        self.shards = self.directory / "shards"
        self.tokenizer = self.directory / "tokenizer.model"
        self.manifest = self.directory / "manifest.json"

    def stage(self, name: str) -> pathlib.Path:
        """datatrove's logging directory of a stage."""
        return self.work / "stages" / name

    def data(self, name: str) -> pathlib.Path:
        return self.work / "data" / name

    @property
    def units(self) -> pathlib.Path:
        """What the source steps read, one JSON line per file or row range (`sources.plan`)."""
        return self.work / "units.jsonl"

    def reports(self, step: str) -> pathlib.Path:
        return self.work / "reports" / step


def task_file(directory, rank: int, suffix: str) -> pathlib.Path:
    return pathlib.Path(directory) / f"{rank:05d}{suffix}"


def write_report(directory, rank: int, report: dict) -> None:
    replace_from_this_process(task_file(directory, rank, ".json"), json.dumps(report, sort_keys=True).encode("utf-8"))


def read_reports(directory) -> list[dict]:
    """Every task's report in a step's report directory, in rank order."""
    return [json.loads(p.read_text()) for p in sorted(pathlib.Path(directory).glob("*.json"))]


def counts(layout: Layout) -> dict:
    """What reading, cleaning and deduplication did, summed over the tasks' reports."""
    read, clean = read_reports(layout.reports("read")), read_reports(layout.reports("clean"))
    return {
        "documents_in": sum(task["documents_in"] for task in read),
        "bytes_in": sum(task["bytes_in"] for task in read),
        "undecodable_files": [f for task in read for f in task["undecodable_files"]],
        "replaced_byte_sequences": sum(task["replaced_byte_sequences"] for task in read),
        "removed_by_filter": _summed(task["removed_by_filter"] for task in clean),
        "pii_replaced": _summed(task["pii_replaced"] for task in clean),
        # datatrove's exact-dedup stage 2 lists each copy as one uint32 document index.
        "exact_duplicates": sum(
            p.stat().st_size // 4
            for p in layout.data("exact_duplicates").rglob(f"*{ExtensionHelperSD.stage_2_duplicates}")
        ),
        "near_duplicates": sum(task["near_duplicates"] for task in read_reports(layout.reports("clusters"))),
    }


def _summed(dicts) -> dict:
    return dict(sorted(sum((collections.Counter(d) for d in dicts), collections.Counter()).items()))


def whitespace_normalized(document: Document) -> str:
    """What exact deduplication hashes (the annotation tells datatrove to hash a str)."""
    return dedup.exact_text(document.text)


def exact_dedup_config() -> ExactDedupConfig:
    return ExactDedupConfig(content_getter=whitespace_normalized, hash_config=EXACT_HASH)


class _JsonLines:
    """Rows written one JSON line each to `path`, which appears only when `close` finishes it.
    JSON lines rather than Parquet for the intermediate text: reading Parquet row groups grew
    a task's memory with the size of its file (pyarrow's allocator keeps what it freed)."""

    def __init__(self, path: pathlib.Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._partial = path.with_suffix(".partial")
        self._file = open(self._partial, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        self._file.write(json.dumps(row, ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._file.close()
        os.replace(self._partial, self.path)


def _rows(path: pathlib.Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            yield json.loads(line)


def replace_from_this_process(path: pathlib.Path, data: bytes) -> None:
    """Writes `path` whole, through a name of this host and process renamed onto it: a killed
    task leaves no half-written file, and the hosts that split the tasks, which each write the
    same driver files (the same bytes) at about the same time, do not write into one another's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.name}.{socket.gethostname()}-{os.getpid()}.partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def write_units(layout: Layout, units: list) -> None:
    lines = "".join(json.dumps(sources.unit_record(unit)) + "\n" for unit in units)
    replace_from_this_process(layout.units, lines.encode("utf-8"))


class ReadSource(PipelineStep):
    """The documents of the source files (or dataset rows) dealt to this task: unit i of
    `write_units` goes to task i % world_size (read from the file, so that the list of every
    file does not travel with the step to each worker). Reports what it read."""

    name = "📖 source"
    type = "📖 - READER"

    def __init__(self, cfg, layout: Layout):
        super().__init__()
        self.cfg, self.units, self.reports = cfg, layout.units, layout.reports("read")

    def _units(self, rank: int, world_size: int) -> Iterator:
        with open(self.units) as lines:
            for index, line in enumerate(lines):
                if index % world_size == rank:
                    yield sources.unit_from_record(json.loads(line))

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        source = sources.SourceReport(kind=self.cfg.source)
        documents, size = 0, 0
        for unit in self._units(rank, world_size):
            for document in sources.read(self.cfg, unit, source):
                documents += 1
                size += len(document.text.encode("utf-8"))
                self.stat_update("documents")
                yield Document(text=document.text, id=document.key)
        write_report(self.reports, rank, {
            "documents_in": documents,
            "bytes_in": size,
            "undecodable_files": source.undecodable_files,
            "replaced_byte_sequences": source.replaced_byte_sequences,
        })


class Clean(BaseFilter):
    """`cleaning.clean` as a datatrove filter: the document continues normalized and scrubbed,
    or is dropped with the name of the first quality filter it fails."""

    name = "🧹 clean"

    def __init__(self, cleaning_cfg, layout: Layout):
        super().__init__()
        self.cleaning_cfg, self.reports = cleaning_cfg, layout.reports("clean")

    def filter(self, document: Document) -> bool | tuple[bool, str]:
        cleaned = cleaning.clean(document.text, self.cleaning_cfg)
        self.pii_replaced.update(cleaned.pii_replaced)
        if cleaned.removed_by:
            self.removed_by[cleaned.removed_by] += 1
            return False, cleaned.removed_by
        document.text = cleaned.text
        return True

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        self.removed_by, self.pii_replaced = collections.Counter(), collections.Counter()
        yield from super().run(data, rank, world_size)
        write_report(self.reports, rank, {
            "removed_by_filter": dict(self.removed_by), "pii_replaced": dict(self.pii_replaced),
        })


class WriteCleaned(PipelineStep):
    """Keeps this task's cleaned documents in `<rank>.jsonl` for the later stages, and passes
    them on."""

    name = "💾 cleaned text"
    type = "💽 - WRITER"

    def __init__(self, layout: Layout):
        super().__init__()
        self.directory = layout.data("cleaned")

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        out = _JsonLines(task_file(self.directory, rank, ".jsonl"))
        for document in data:
            out.write({"key": document.id, "text": document.text})
            yield document
        out.close()


class ReadCleaned(PipelineStep):
    """The documents `WriteCleaned` kept for this task, in the same order."""

    name = "📖 cleaned text"
    type = "📖 - READER"

    def __init__(self, layout: Layout):
        super().__init__()
        self.directory = layout.data("cleaned")

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for row in _rows(task_file(self.directory, rank, ".jsonl")):
            yield Document(text=row["text"], id=row["key"])


def minhash_config(dedup_cfg) -> MinhashConfig:
    bands, rows = dedup.lsh_bands(dedup_cfg.threshold, dedup_cfg.num_perm)
    return MinhashConfig(
        n_grams=dedup_cfg.ngram, num_buckets=bands, hashes_per_bucket=rows, seed=dedup_cfg.seed,
        hash_config=MINHASH_HASH,
    )


class MinhashSignatures(MinhashDedupSignature):
    """datatrove's MinHash stage 1 with the project's signatures (`dedup.MinHasher` over the
    word hashes of `words.hash_words`), written as datatrove's sorted bucket files; the whole
    signature of each document also goes to `full/<rank>.sig` (uint32 document index, then
    uint32[num_perm]), against which `VerifiedClusters` checks the candidate pairs."""

    def __init__(self, layout: Layout, dedup_cfg):
        super().__init__(
            str(layout.data("minhash_signatures")), minhash_config(dedup_cfg), language=words.WordSplitter()
        )
        self.full_folder = layout.data("minhash_full")
        self.minhasher = dedup.MinHasher(dedup_cfg.num_perm, dedup_cfg.ngram, dedup_cfg.seed)

    def get_shingles(self, text: str) -> np.ndarray:
        """The word hashes: MinHasher makes the n-gram shingles from them."""
        return words.hash_words(text)[0]

    def get_signature(self, word_hashes: np.ndarray) -> list[list[int]]:
        signature = self.minhasher.signature(word_hashes).astype(np.uint32)
        self._full.write(np.uint32(self._document_index).tobytes() + signature.tobytes())
        banded = signature[: self.config.num_buckets * self.config.hashes_per_bucket]
        return [band.tolist() for band in np.split(banded, self.config.num_buckets)]

    def _numbered(self, data: DocumentsPipeline) -> DocumentsPipeline:
        for index, document in enumerate(data):
            self._document_index = index
            yield document

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        path = task_file(self.full_folder, rank, ".sig")
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".partial"), "wb") as self._full:
            super().run(self._numbered(data), rank, world_size)
        os.replace(path.with_suffix(".partial"), path)


def full_signature_dtype(num_perm: int) -> np.dtype:
    return np.dtype([("document", "<u4"), ("signature", "<u4", (num_perm,))])


class VerifiedClusters(PipelineStep):
    """MinHash stage 3 (one task): documents whose whole signatures agree on at least
    `threshold` of their slots, among those sharing a band, are joined into clusters, and every
    document of a cluster but the first (lowest task, then lowest index) is listed in
    `<task>.remove` for datatrove's MinhashDedupFilter. datatrove's own stage 3 joins every
    candidate, so pairs well below the threshold that share one band would be removed too.

    datatrove's bucket stage writes, for the k documents sharing a band's value, only the k - 1
    pairs of neighbours in its sort order: a chain. Checking only those pairs, a dissimilar
    document between two near-duplicates would keep them apart. So each chain is rebuilt, and
    each of its documents is checked against its neighbour and against the first document of
    every cluster the chain's earlier documents belong to: one check per cluster, not per pair,
    as a band's value shared by thousands of boilerplate files is one cluster."""

    name = "🎯 MinHash verified clusters"
    type = "🫂 - DEDUP"

    def __init__(self, layout: Layout, dedup_cfg):
        super().__init__()
        self.pairs, self.full = layout.data("minhash_pairs"), layout.data("minhash_full")
        self.removed, self.reports = layout.data("minhash_removed"), layout.reports("clusters")
        self.num_perm, self.threshold = dedup_cfg.num_perm, dedup_cfg.threshold

    def _signatures(self, task: int, cache: dict) -> np.ndarray:
        if task not in cache:
            path = task_file(self.full, task, ".sig")
            # Mapped, not read: only the pages of the candidates are touched.
            cache[task] = np.memmap(path, dtype=full_signature_dtype(self.num_perm), mode="r")
        return cache[task]

    def _signature(self, task: int, document: int, cache: dict) -> np.ndarray:
        records = self._signatures(task, cache)
        return records["signature"][np.searchsorted(records["document"], document)]

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        parent, cache = {}, {}
        candidates, verified = 0, 0

        def root(node):
            while parent.get(node, node) != node:
                node = parent[node]
            return node

        for path in sorted(pathlib.Path(self.pairs).glob("*.dups")):
            pairs = np.fromfile(path, dtype="<u4").reshape(-1, 4).tolist()
            candidates += len(pairs)
            for chain in band_chains(pairs):
                firsts = [root(chain[0])]  # of the clusters of the chain's documents so far
                for neighbour, document in zip(chain, chain[1:]):
                    signature = self._signature(*document, cache)
                    matches = [
                        other for other in dict.fromkeys([*firsts, neighbour])
                        if dedup.estimated_jaccard(signature, self._signature(*other, cache)) >= self.threshold
                    ]
                    verified += len(matches)
                    for other in matches:
                        root_a, root_b = root(document), root(other)
                        if root_a != root_b:  # the first document of the cluster stays its root
                            parent[max(root_a, root_b)] = min(root_a, root_b)
                    firsts = list(dict.fromkeys(root(first) for first in [*firsts, document]))
        removed = collections.defaultdict(list)
        for node in parent:
            if root(node) != node:
                removed[node[0]].append(node[1])
        directory = pathlib.Path(self.removed)
        directory.mkdir(parents=True, exist_ok=True)
        for task, documents in removed.items():
            path = directory / f"{task:06d}.remove"  # datatrove's name for it
            replace_from_this_process(path, np.array(sorted(documents), "<u4").tobytes())
        write_report(self.reports, rank, {
            "candidate_pairs": candidates,
            "verified_pairs": verified,
            "near_duplicates": sum(map(len, removed.values())),
        })


def band_chains(pairs: list[list[int]]) -> list[list[tuple[int, int]]]:
    """The chains of one band's pairs file, as datatrove's bucket stage writes them: a pair
    (a, b) whose a is the last document of the chain before it continues that chain (a document
    has one value per band, so it is in at most one chain)."""
    chains = []
    for task_a, document_a, task_b, document_b in pairs:
        a, b = (task_a, document_a), (task_b, document_b)
        if chains and chains[-1][-1] == a:
            chains[-1].append(b)
        else:
            chains.append([a, b])
    return chains


def in_validation(key: str, val_fraction: float) -> bool:
    return sources.stable_fraction(key) < val_fraction


class SampleForTokenizer(PipelineStep):
    """This task's part of the tokenizer sample: the training documents that come first in the
    order of a hash of their keys, until `sample_bytes`. The sample of the whole corpus, the
    same documents taken in the same order, is contained in the union of these parts."""

    name = "🎲 tokenizer sample"
    type = "🔢 - TOKENIZER"

    def __init__(self, layout: Layout, val_fraction: float, sample_bytes: int):
        super().__init__()
        self.directory = layout.data("tokenizer_sample")
        self.val_fraction, self.sample_bytes = val_fraction, sample_bytes

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        heap, total = [], 0  # heap of (-fraction, key, text, bytes): the largest fraction on top
        for document in data:
            if in_validation(document.id, self.val_fraction):
                continue
            fraction = sources.stable_fraction(document.id, purpose="tokenizer")
            if total >= self.sample_bytes and -heap[0][0] < fraction:
                continue
            size = len(document.text.encode("utf-8"))
            heapq.heappush(heap, (-fraction, document.id, document.text, size))
            total += size
            while total - heap[0][3] >= self.sample_bytes:
                total -= heapq.heappop(heap)[3]
        out = _JsonLines(task_file(self.directory, rank, ".jsonl"))
        for negative_fraction, key, text, _ in sorted(heap, reverse=True):
            out.write({"key": key, "fraction": -negative_fraction, "text": text})
        out.close()


class TrainTokenizer(PipelineStep):
    """One task: SentencePiece trained on the merged tokenizer sample, saved as the corpus's
    `tokenizer.model`."""

    name = "🔤 train tokenizer"
    type = "🔢 - TOKENIZER"

    def __init__(self, layout: Layout, tokenizer_cfg, val_fraction: float):
        super().__init__()
        self.layout, self.tokenizer_cfg, self.val_fraction = layout, tokenizer_cfg, val_fraction

    def _no_training_documents(self) -> ValueError:
        done = counts(self.layout)
        removed = sum(done["removed_by_filter"].values()) + done["exact_duplicates"] + done["near_duplicates"]
        if removed < done["documents_in"]:
            return ValueError(
                f"the train split is empty: {done['documents_in'] - removed} documents, "
                f"val_fraction={self.val_fraction}; add documents or change val_fraction"
            )
        return ValueError(
            f"nothing left after cleaning and deduplication of {done['documents_in']} documents: "
            f"removed by filter {done['removed_by_filter']}, exact duplicates "
            f"{done['exact_duplicates']}, near duplicates {done['near_duplicates']}; relax the "
            "data.cleaning thresholds"
        )

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        rows = [row for f in sorted(self.layout.data("tokenizer_sample").glob("*.jsonl")) for row in _rows(f)]
        if not rows:
            raise self._no_training_documents()
        texts, taken = [], 0
        for row in sorted(rows, key=lambda r: (r["fraction"], r["key"])):
            if taken >= self.tokenizer_cfg.sample_bytes:
                break
            texts.append(row["text"])
            taken += len(row["text"].encode("utf-8"))
        trained = tokenizer_lib.train(
            tokenizer_lib.training_pieces(texts), self.tokenizer_cfg, num_threads=os.cpu_count() or 1
        )
        replace_from_this_process(self.layout.tokenizer, trained.model_proto)
        write_report(self.layout.reports("tokenizer"), rank, {"trained_on_bytes": taken})


class TokenizeShards(PipelineStep):
    """[BOS] tokens [EOS] of each document into this task's train and val shards (by a hash of
    the document's key); reports each shard's manifest entry and the split's UTF-8 bytes."""

    name = "🔢 tokenize into shards"
    type = "🔢 - TOKENIZER"

    def __init__(self, layout: Layout, val_fraction: float):
        super().__init__()
        self.directory, self.tokenizer_path = layout.shards, layout.tokenizer
        self.reports, self.val_fraction = layout.reports("tokenize"), val_fraction

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1):
        tokenizer = tokenizer_lib.Tokenizer.load(self.tokenizer_path)
        dtype = token_cache.token_dtype(tokenizer.vocab_size)
        splits = ("train", "val")
        writers = {s: token_cache.ShardWriter(self.directory, f"{s}-{rank:05d}", dtype) for s in splits}
        pending = {s: [] for s in splits}
        text_bytes = dict.fromkeys(splits, 0)

        def encode(split):
            for ids in tokenizer.encode_arrays(pending[split], add_bos=True, add_eos=True):
                writers[split].write(ids)
            pending[split] = []

        for document in data:
            split = "val" if in_validation(document.id, self.val_fraction) else "train"
            pending[split].append(document.text)
            text_bytes[split] += len(document.text.encode("utf-8"))
            if len(pending[split]) == _ENCODE_BATCH:
                encode(split)
        for split in splits:
            encode(split)
        write_report(self.reports, rank, {
            split: {**writers[split].close(), "bytes": text_bytes[split]} for split in splits
        })


def manifest_digest(manifest: dict) -> str:
    """sha256 of what the tokens are: the tokenizer, the token type, every shard's digest and
    counts; not of the report (timings, how the work was run)."""
    content = {key: manifest[key] for key in ("tokenizer", "token_dtype", "splits")}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


class WriteManifest(PipelineStep):
    """One task, the last: `manifest.json` from the shard entries and the reports of every
    step, written only when all of them are there. `report` holds what the driver knows: the
    source listing, the settings that shaped the work."""

    name = "📜 manifest"
    type = "💽 - WRITER"

    def __init__(self, layout: Layout, report: dict, val_fraction: float):
        super().__init__()
        self.layout, self.report, self.val_fraction = layout, report, val_fraction

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1):
        shards = read_reports(self.layout.reports("tokenize"))
        tokenizer = tokenizer_lib.Tokenizer.load(self.layout.tokenizer)
        splits = {}
        for split in ("train", "val"):
            entries = [task[split] for task in shards]
            splits[split] = {
                "documents": sum(e["documents"] for e in entries),
                "tokens": sum(e["tokens"] for e in entries),
                "bytes": sum(e["bytes"] for e in entries),
                "shards": [{k: e[k] for k in ("name", "documents", "tokens", "sha256")} for e in entries],
            }
        documents = sum(s["documents"] for s in splits.values())
        for split, totals in splits.items():
            if not totals["documents"]:
                raise ValueError(
                    f"the {split} split is empty: {documents} documents, "
                    f"val_fraction={self.val_fraction}; add documents or change val_fraction"
                )
        manifest = {
            "tokenizer": {
                "file": self.layout.tokenizer.name,
                "sha256": hashlib.sha256(tokenizer.model_proto).hexdigest(),
            },
            "token_dtype": token_cache.token_dtype(tokenizer.vocab_size).str,
            "splits": splits,
        }
        manifest["digest"] = manifest_digest(manifest)
        manifest["report"] = self._report(splits, tokenizer)
        replace_from_this_process(self.layout.manifest, json.dumps(manifest, indent=1).encode("utf-8"))

    def _report(self, splits: dict, tokenizer) -> dict:
        done = counts(self.layout)
        source = {
            **self.report["source"],
            "undecodable_files": done.pop("undecodable_files"),
            "replaced_byte_sequences": done.pop("replaced_byte_sequences"),
        }
        trained = read_reports(self.layout.reports("tokenizer"))
        val = splits["val"]
        return {
            **self.report,
            **done,
            "source": source,
            "documents_out": sum(s["documents"] for s in splits.values()),
            "bytes_out": sum(s["bytes"] for s in splits.values()),
            "splits": {
                name: {"documents": s["documents"], "bytes": s["bytes"], "tokens": s["tokens"], "shards": len(s["shards"])}
                for name, s in splits.items()
            },
            "tokenizer": {
                **self.report["tokenizer"],
                "vocab_size": tokenizer.vocab_size,
                "trained_on_bytes": sum(task["trained_on_bytes"] for task in trained),
            },
            # BOS and EOS carry no text, so they are left out of the ratio.
            "bytes_per_token": val["bytes"] / max(val["tokens"] - 2 * val["documents"], 1),
        }
