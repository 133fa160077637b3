import collections
import json
import math
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from data import packing, pipeline

SEQ_LEN = 32


def _expected_chunks(corpus, split: str, seq_len: int) -> collections.Counter:
    """Independent reference: each document cut into L + 1 tokens overlapping by one."""
    cached = corpus.split(split)
    chunks = collections.Counter()
    for i in range(cached.num_documents):
        document = cached.document(i).tolist()
        for start in range(0, len(document) - 1, seq_len):
            chunks[tuple(document[start : start + seq_len + 1])] += 1
    return chunks


def _chunks_in(batches, pad_id: int) -> list[tuple]:
    """The chunks in the rows, in order, checking segment ids, positions and padding on the way."""
    chunks = []
    for batch in batches:
        assert set(batch) == {"inputs", "targets", "segment_ids", "positions"}
        assert all(v.dtype == np.int32 and v.shape == batch["inputs"].shape for v in batch.values())
        for inputs, targets, segments, positions in zip(
            batch["inputs"], batch["targets"], batch["segment_ids"], batch["positions"]
        ):
            used = segments > 0
            assert np.all(inputs[~used] == pad_id) and np.all(positions[~used] == 0)
            # Segments fill the row from the left as 1, 2, ..., k.
            assert np.all(np.diff(segments[used]) >= 0) and np.all(used[: used.sum()])
            for segment in range(1, segments.max() + 1):
                where = segments == segment
                assert np.array_equal(positions[where], np.arange(where.sum()))
                assert np.array_equal(targets[where][:-1], inputs[where][1:])
                chunks.append((*inputs[where].tolist(), int(targets[where][-1])))
    return chunks


def test_chunks_cut_documents_into_overlapping_pieces():
    # Documents of 2 and 5 tokens: 1 and 4 pairs.
    assert [c.tolist() for c in packing.Chunks(seq_len=2).flat_map(np.array([7, 8]))] == [[7, 8]]
    document = np.arange(5)
    chunks = packing.Chunks(seq_len=2).flat_map(document)
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [2, 3, 4]]
    assert all(np.shares_memory(c, document) for c in chunks)  # views, not copies


def test_packing_loses_no_token_and_keeps_order(prepared):
    it = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=1, num_epochs=1)
    chunks = _chunks_in(it, prepared.tokenizer.pad_id)
    assert collections.Counter(chunks) == _expected_chunks(prepared, "train", SEQ_LEN)


def test_rows_are_well_packed(prepared):
    it = pipeline.train_iterator(prepared, seq_len=1024, batch_size=8)
    segment_ids = np.concatenate([next(it)["segment_ids"] for _ in range(8)])
    assert (segment_ids > 0).mean() > 0.9
    assert (segment_ids.max(axis=1) > 1).mean() > 0.1  # document ends share rows


def _document_chunks(document: list, seq_len: int) -> collections.Counter:
    return collections.Counter(
        tuple(document[start : start + seq_len + 1]) for start in range(0, len(document) - 1, seq_len)
    )


@pytest.mark.parametrize("shard_count", [2, 4])
def test_host_shards_read_disjoint_documents_that_make_up_the_train_split(prepared, shard_count):
    split = prepared.split("train")
    documents = [split.document(i).tolist() for i in range(split.num_documents)]
    hosts = [list(range(len(documents)))[i::shard_count] for i in range(shard_count)]
    assert sorted(sum(hosts, [])) == list(range(len(documents)))  # disjoint, and all of the split
    for i, host in enumerate(hosts):
        it = pipeline.train_iterator(
            prepared, seq_len=SEQ_LEN, batch_size=1, num_epochs=1, shard_index=i, shard_count=shard_count
        )
        expected = sum((_document_chunks(documents[d], SEQ_LEN) for d in host), collections.Counter())
        assert collections.Counter(_chunks_in(it, prepared.tokenizer.pad_id)) == expected


@pytest.mark.parametrize("shard_count", [1, 3])
def test_eval_batches_cover_validation_exactly_once(prepared, shard_count):
    shards = [
        list(pipeline.eval_batches(prepared, seq_len=SEQ_LEN, batch_size=4, shard_index=i, shard_count=shard_count))
        for i in range(shard_count)
    ]
    assert len({len(batches) for batches in shards}) == 1  # every process runs the same number of steps
    chunks = [c for batches in shards for c in _chunks_in(batches, prepared.tokenizer.pad_id)]
    assert collections.Counter(chunks) == _expected_chunks(prepared, "val", SEQ_LEN)
    # Rows are dealt to the shards in turn; the last batches are filled with empty rows.
    used = [int((b["segment_ids"].sum(axis=1) > 0).sum()) for batches in shards for b in batches]
    batches_per_shard = math.ceil(math.ceil(sum(used) / shard_count) / 4)
    assert all(len(batches) == batches_per_shard for batches in shards)
    empty = [int((b["segment_ids"].sum(axis=1) == 0).sum()) for batches in shards for b in batches]
    assert sum(empty) == shard_count * batches_per_shard * 4 - sum(used)


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    def first(seed, n=4):
        it = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4, seed=seed)
        return [next(it) for _ in range(n)]

    a, b, c = first(1), first(1), first(2)
    assert all(np.array_equal(x[k], y[k]) for x, y in zip(a, b) for k in x)
    assert not all(np.array_equal(x["inputs"], z["inputs"]) for x, z in zip(a, c))


def test_each_epoch_is_reshuffled(prepared):
    it = pipeline.train_iterator(prepared, seq_len=128, batch_size=1, num_epochs=2)
    chunks = _chunks_in(it, prepared.tokenizer.pad_id)
    expected = _expected_chunks(prepared, "train", 128)
    assert collections.Counter(chunks) == expected + expected
    half = len(chunks) // 2
    same_place = sum(a == b for a, b in zip(chunks[:half], chunks[half:]))
    assert same_place < half // 4


_RESUME = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from data import pipeline
    from tests.data import corpora

    corpus_dir, cache_dir, state, count, out = sys.argv[1:]
    corpus = pipeline.open_corpus(corpora.small_config(corpus_dir, cache_dir))
    it = pipeline.train_iterator(corpus, seq_len=32, batch_size=4, seed=7)
    it.set_state(json.loads(state))
    batches = [next(it) for _ in range(int(count))]
    np.savez(out, **{f"{i}/{k}": v for i, b in enumerate(batches) for k, v in b.items()})
    """
)


def test_iterator_state_resumes_exactly_in_a_new_process(prepared, text_corpus, tmp_path):
    it = pipeline.train_iterator(prepared, seq_len=32, batch_size=4, seed=7)
    for _ in range(5):
        next(it)
    state = json.dumps(it.get_state())
    expected = [next(it) for _ in range(3)]
    out = tmp_path / "resumed.npz"
    cache_dir = prepared.config.cache_dir
    subprocess.run(
        [sys.executable, "-c", _RESUME, str(text_corpus[0]), cache_dir, state, "3", str(out)],
        check=True,
        cwd=pipeline.pathlib.Path(__file__).resolve().parents[2],
    )
    resumed = np.load(out)
    for i, batch in enumerate(expected):
        for key, value in batch.items():
            assert np.array_equal(resumed[f"{i}/{key}"], value), (i, key)


def test_iterator_state_is_small_and_names_the_manifest(prepared):
    it = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4, seed=7)
    for _ in range(50):
        next(it)
    state = json.dumps(it.get_state())
    assert len(state) < 1024, state  # indices and counters only, whatever the corpus size
    assert json.loads(state)["manifest_digest"] == prepared.digest


def test_resuming_on_another_token_cache_is_refused_naming_both_digests(prepared):
    it = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4)
    state = {**it.get_state(), "manifest_digest": "f" * 64}
    with pytest.raises(ValueError, match=rf"manifest digest {'f' * 64}, but this run reads one with digest {prepared.digest}"):
        it.set_state(state)


def test_worker_processes_resume_exactly_and_match_in_process_reading(prepared):
    def batches(it, n):
        return [next(it) for _ in range(n)]

    in_process = batches(pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4, seed=3), 6)
    it = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4, seed=3, worker_count=1)
    first = batches(it, 3)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    rest = batches(it, 3)
    it.close()
    resumed = pipeline.train_iterator(prepared, seq_len=SEQ_LEN, batch_size=4, seed=3, worker_count=1)
    resumed.set_state(state)
    again = batches(resumed, 3)
    resumed.close()
    for x, y in zip(first + rest, in_process):
        assert all(np.array_equal(x[k], y[k]) for k in x)
    for x, y in zip(again, rest):
        assert all(np.array_equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(seq_len=0, batch_size=4), r"seq_len=0"),
        (dict(seq_len=8, batch_size=0), r"batch_size=0"),
        (dict(seq_len=8, batch_size=4, shard_index=2, shard_count=2), r"shard_index=2 is not in \[0, shard_count=2\)"),
        (dict(seq_len=8, batch_size=4, shard_index=10**7 - 1, shard_count=10**7), r"gets no training data"),
        (dict(seq_len=8, batch_size=4, seed=-1), r"seed=-1"),
    ],
)
def test_requests_that_cannot_be_served_are_named(prepared, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipeline.train_iterator(prepared, **kwargs)
