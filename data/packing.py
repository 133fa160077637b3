"""Packed batches from the token cache with grain: chunk, shuffle, pack, batch, shard.

A batch is a dict of int32 [B, L] arrays:
  inputs, targets  next-token pairs; within a document targets[t] == inputs[t + 1]
  segment_ids      1, 2, ... for the documents of a row; 0 marks padding (loss mask: > 0)
  positions        0, 1, ... restarting at every document
A document [BOS, t1..tn, EOS] contributes the pairs (doc[:-1], doc[1:]). One longer than L pairs
is cut into chunks of L + 1 tokens overlapping by one token, so no target is lost; each chunk is
its own segment. grain's first-fit packing places whole chunks into rows, so every token of
every document lands in exactly one row, in order.
"""

import dataclasses
import functools
import math
import pathlib
from collections.abc import Iterator

import grain
import numpy as np
from absl import flags

from data import token_cache

PACKING_BINS = 64  # rows filled at once; more bins pack tighter but delay the first batch
# Reading a chunk is a memmap slice: grain's reader threads would only add locking (its default
# 16 threads and 500-element buffer cut packed-batch throughput by more than half here).
_READ_IN_PLACE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def chunk_spans(offsets: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(starts, ends) token spans of the chunks, each of at most seq_len (input, target) pairs."""
    document_starts = offsets[:-1]
    pairs = np.diff(offsets) - 1
    chunks_per_document = -(-pairs // seq_len)
    document = np.repeat(np.arange(pairs.size), chunks_per_document)
    first_chunk = np.cumsum(chunks_per_document) - chunks_per_document
    chunk_in_document = np.arange(document.size) - first_chunk[document]
    starts = document_starts[document] + chunk_in_document * seq_len
    ends = np.minimum(starts + seq_len + 1, offsets[document + 1])
    return starts, ends


@dataclasses.dataclass
class ReadChunk:
    """Chunk index -> {"pairs": int32[n, 2]} of (input, target) tokens.

    Inputs and targets travel as one [n, 2] feature so that the packer places one array per
    chunk instead of two. Holds only paths and sizes, so it pickles cheaply into grain's worker
    processes; each process maps the token file and computes the chunk table on first use.
    """

    directory: pathlib.Path
    split: str
    dtype: str
    seq_len: int

    @functools.cached_property
    def _table(self):
        split = token_cache.TokenizedSplit(self.directory, self.split, np.dtype(self.dtype))
        # A plain ndarray view of the mapped file: slicing np.memmap itself is several times slower.
        tokens = np.asarray(split.tokens)
        return (tokens, *chunk_spans(split.offsets, self.seq_len))

    def __len__(self) -> int:
        return self._table[1].size

    def __call__(self, index: int) -> dict[str, np.ndarray]:
        tokens, starts, ends = self._table
        chunk = tokens[starts[index] : ends[index]]
        pairs = np.empty((chunk.size - 1, 2), np.int32)
        pairs[:, 0], pairs[:, 1] = chunk[:-1], chunk[1:]
        return {"pairs": pairs}

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_table"}


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


def _read_chunk(corpus, split: str, seq_len: int) -> ReadChunk:
    return ReadChunk(corpus.directory, split, corpus.token_dtype.str, seq_len)


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
) -> grain.DatasetIterator:
    """Packed training batches; endless unless num_epochs is set (then a last partial batch is
    dropped).

    Process `shard_index` of `shard_count` reads every shard_count-th chunk. Each epoch is
    reshuffled (grain folds the epoch into `seed`). `get_state()` / `set_state()` resume exactly,
    also in a new process, given the same corpus, arguments and worker_count (default:
    corpus.config.worker_count; 0 reads in this process).
    """
    check_request(seq_len, batch_size, shard_index, shard_count, seed)
    read_chunk = _read_chunk(corpus, "train", seq_len)
    chunks = grain.MapDataset.range(len(read_chunk))[shard_index::shard_count]
    if len(chunks) == 0:
        raise ValueError(
            f"shard {shard_index} of {shard_count} gets no training data: the train split has "
            f"{len(read_chunk)} chunks of at most seq_len={seq_len} tokens"
        )
    dataset = chunks.shuffle(seed=seed).repeat(num_epochs).map(read_chunk)
    dataset = dataset.to_iter_dataset(_READ_IN_PLACE)
    dataset = pack(dataset, "pairs", seq_len, corpus.tokenizer.pad_id, seed, shuffle_bins=True)
    dataset = dataset.batch(batch_size, drop_remainder=True).map(_split_pairs)
    worker_count = corpus.config.worker_count if worker_count is None else worker_count
    if worker_count:
        # grain's workers read an absl flag; parse-less programs (tests, notebooks) must mark
        # flags parsed first (grain issue 1355).
        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=worker_count))
    return iter(dataset)


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
    read_chunk = _read_chunk(corpus, "val", seq_len)
    chunks = grain.MapDataset.range(len(read_chunk)).map(read_chunk)
    chunks = chunks.to_iter_dataset(_READ_IN_PLACE)
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
