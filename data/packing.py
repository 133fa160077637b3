"""Packed batches from the token shards with grain: shuffle documents, chunk, pack, batch, shard.

A batch is a dict of int32 [B, L] arrays:
  inputs, targets  next-token pairs; within a document targets[t] == inputs[t + 1]
  segment_ids      1, 2, ... for the documents of a row; 0 marks padding (loss mask: > 0)
  positions        0, 1, ... restarting at every segment (a document, or a chunk of a long one)
A document [BOS, t1..tn, EOS] contributes the pairs (doc[:-1], doc[1:]). One longer than L pairs
is cut into chunks of L + 1 tokens overlapping by one token, so no target is lost; each chunk is
its own segment. grain's first-fit packing places whole chunks into rows, so every token of
every document lands in exactly one row, in order.

The index is over documents, counted through the manifest's shards (memory grows with shards,
not documents or tokens); host `shard_index` of `shard_count` reads every shard_count-th
document. Training documents are shuffled, then their chunks within a window of
`SHUFFLE_WINDOW` chunks (or the host's epoch, if shorter), so that the chunks of a long document spread over many batches
instead of filling neighbouring rows, and a run shorter than an epoch still sees chunks of
many documents. The window holds views into the mapped shards, not copies.
"""

import dataclasses
import math
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags

PACKING_BINS = 64  # rows filled at once; more bins pack tighter but delay the first batch
SHUFFLE_WINDOW = 65_536  # chunks shuffled together (array views of 112 bytes, whatever seq_len)
# Reading a document is a memmap slice: grain's reader threads would only add locking (its
# default 16 threads and 500-element buffer cut packed-batch throughput by more than half here).
_READ_IN_PLACE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


@dataclasses.dataclass
class Chunks(grain.experimental.FlatMapTransform):
    """Document -> its chunks of at most seq_len + 1 tokens overlapping by one: views of the
    document, no copies."""

    seq_len: int
    max_fan_out: int = 2**31 - 1  # grain checks it only for map datasets; documents have any length

    def flat_map(self, document: np.ndarray) -> list[np.ndarray]:
        return [document[start : start + self.seq_len + 1] for start in range(0, len(document) - 1, self.seq_len)]


def _pairs(chunk: np.ndarray) -> dict[str, np.ndarray]:
    """{"pairs": int32[n, 2]} of the chunk's (input, target) tokens: one feature, so that the
    packer places one array per chunk instead of two."""
    pairs = np.empty((chunk.size - 1, 2), np.int32)
    pairs[:, 0], pairs[:, 1] = chunk[:-1], chunk[1:]
    return {"pairs": pairs}


class DataChanged(ValueError):
    """A checkpoint's data-iterator state belongs to another token cache."""


class Batches(grain.DatasetIterator):
    """The training iterator: grain's, with the digest of the manifest it reads in its state, so
    that a checkpoint cannot resume on another token cache."""

    def __init__(self, parent: grain.DatasetIterator, manifest_digest: str):
        super().__init__(parent)
        self.manifest_digest = manifest_digest

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict:
        return {"manifest_digest": self.manifest_digest, "batches": self._parent.get_state()}

    def set_state(self, state: dict) -> None:
        if state["manifest_digest"] != self.manifest_digest:
            raise DataChanged(
                f"the checkpoint was saved reading the token cache with manifest digest "
                f"{state['manifest_digest']}, but this run reads one with digest "
                f"{self.manifest_digest}: the data changed (see data_report.json); train in a new "
                "workdir or point data.cache_dir at the cache the run started with"
            )
        self._parent.set_state(state["batches"])

    def close(self) -> None:
        self._parent.close()


def _split_pairs(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {
        "inputs": np.ascontiguousarray(packed["pairs"][..., 0]),
        "targets": np.ascontiguousarray(packed["pairs"][..., 1]),
        "segment_ids": packed["pairs_segment_ids"],
        "positions": packed["pairs_positions"],
    }


def check_request(seq_len, batch_size, shard_index, shard_count, seed=0) -> None:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len}: a row needs room for at least one token")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: the per-process batch must be at least 1")
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} is not in [0, shard_count={shard_count})")
    if not 0 <= seed < 2**32:
        raise ValueError(f"seed={seed} is not in [0, 2**32)")


def pack(
    items: grain.IterDataset, feature: str, seq_len: int, pad_id: int, seed: int, shuffle_bins: bool
):
    """First-fit packing of items with one [n, ...] array `feature` into rows of seq_len; adds
    `<feature>_segment_ids` and `<feature>_positions`."""
    return grain.experimental.FirstFitPackIterDataset(
        items,
        length_struct={feature: seq_len},
        num_packing_bins=PACKING_BINS,
        seed=seed,
        shuffle_bins=shuffle_bins,
        padding_struct={feature: pad_id},
    )


def train_iterator(
    corpus,
    *,
    seq_len: int,
    batch_size: int,
    seed: int = 0,
    shard_index: int = 0,
    shard_count: int = 1,
    num_epochs: int | None = None,
    worker_count: int | None = None,
) -> Batches:
    """Packed training batches; endless unless num_epochs is set (then a last partial batch is
    dropped).

    Process `shard_index` of `shard_count` reads every shard_count-th document. Each epoch is
    reshuffled (grain folds the epoch into `seed`). `get_state()` / `set_state()` resume exactly,
    also in a new process, given the same corpus, arguments and worker_count (default:
    corpus.config.worker_count; 0 reads in this process).
    """
    check_request(seq_len, batch_size, shard_index, shard_count, seed)
    split = corpus.split("train")
    documents = grain.MapDataset.range(split.num_documents)[shard_index::shard_count]
    if len(documents) == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} gets no training data: the train split has "
            f"{split.num_documents} documents"
        )
    dataset = documents.shuffle(seed=seed).repeat(num_epochs).map(split.document)
    dataset = dataset.to_iter_dataset(_READ_IN_PLACE)
    dataset = grain.experimental.FlatMapIterDataset(dataset, Chunks(seq_len))
    # Each document adds at most one chunk beyond its tokens / seq_len.
    epoch_chunks = (split.num_tokens // seq_len + split.num_documents) // shard_count + 1
    window = min(SHUFFLE_WINDOW, epoch_chunks)
    dataset = grain.experimental.WindowShuffleIterDataset(dataset, window_size=window, seed=seed)
    dataset = pack(dataset.map(_pairs), "pairs", seq_len, corpus.tokenizer.pad_id, seed, shuffle_bins=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).map(_split_pairs)
    worker_count = corpus.config.worker_count if worker_count is None else worker_count
    if worker_count:
        # grain's workers read an absl flag; parse-less programs (tests, notebooks) must mark
        # flags parsed first (grain issue 1355).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return Batches(iter(dataset), corpus.digest)


def eval_batches(
    corpus, *, seq_len: int, batch_size: int, shard_index: int = 0, shard_count: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Packed validation batches covering the validation split exactly once across all shards.

    Every process packs the whole (small) validation split the same way and keeps rows
    shard_index, shard_index + shard_count, ...; the last batch is filled with all-padding rows,
    and every shard yields the same number of batches, so a collective eval step never waits on
    a process that has run out.
    """
    check_request(seq_len, batch_size, shard_index, shard_count)
    split = corpus.split("val")
    documents = grain.MapDataset.range(split.num_documents).map(split.document)
    chunks = grain.experimental.FlatMapIterDataset(documents.to_iter_dataset(_READ_IN_PLACE), Chunks(seq_len))
    chunks = chunks.map(_pairs)
    pad_id = corpus.tokenizer.pad_id
    rows, total_rows, emitted = [], 0, 0
    for row in pack(chunks, "pairs", seq_len, pad_id, seed=0, shuffle_bins=False):
        if total_rows % shard_count == shard_index:
            rows.append(row)
            if len(rows) == batch_size:
                yield _split_pairs(_stack(rows))
                rows, emitted = [], emitted + 1
        total_rows += 1
    padding = {
        "pairs": np.full((seq_len, 2), pad_id, np.int32),
        "pairs_segment_ids": np.zeros(seq_len, np.int32),
        "pairs_positions": np.zeros(seq_len, np.int32),
    }
    batches_per_shard = math.ceil(math.ceil(total_rows / shard_count) / batch_size)
    while emitted < batches_per_shard:
        yield _split_pairs(_stack(rows + [padding] * (batch_size - len(rows))))
        rows, emitted = [], emitted + 1


def _stack(rows: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}
