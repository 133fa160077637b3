"""The post-training data pipeline: separate tokenization of prompt and response, the loss mask,
truncation and drops, SFT packing, the preference and KTO layouts, exact resume, attached
fields, eval coverage across processes, and the errors for bad input."""

import collections
import json
import random

import numpy as np
import pytest

from align import data
from data import pipeline, tokenizer
from tests.data import corpora

BOS, EOS = tokenizer.BOS_ID, tokenizer.EOS_ID
T = 24
ROW_KEYS = data.ROW_KEYS


@pytest.fixture(scope="module")
def words():
    return corpora.vocabulary(random.Random(0), size=300)


@pytest.fixture(scope="module")
def tok(words):
    rng = random.Random(1)
    cfg = pipeline.default_config().tokenizer
    cfg.vocab_size = 400
    return tokenizer.train([corpora.prose(rng, 100, words) for _ in range(40)], cfg)


def _text(rng, words, low, high):
    return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))


def _write(tmp_path, records, name="data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return str(path)


def _load(kind, tok, path, seq_len=T, max_prompt_len=8, split="train"):
    cfg = data.default_config()
    cfg.train_paths = cfg.eval_paths = (path,)
    cfg.max_prompt_len = max_prompt_len
    return data.load(kind, cfg, tok, split=split, seq_len=seq_len)


def _records(kind, words, n, seed=0):
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        record = {"prompt": _text(rng, words, 0, 5)}
        if kind == "sft":
            record["response"] = _text(rng, words, 1, 6)
        elif kind == "preference":
            record.update(chosen=_text(rng, words, 1, 6), rejected=_text(rng, words, 1, 6))
        else:
            record.update(completion=_text(rng, words, 1, 6), label=rng.random() < 0.5)
        records.append(record)
    return records


def _segments(batch_rows):
    """(tokens, loss-masked targets) of each segment of [..., T] rows, checking segment ids,
    positions and padding on the way."""
    inputs, targets, segments, positions, mask = (
        batch_rows[k].reshape(-1, batch_rows[k].shape[-1]) for k in ROW_KEYS
    )
    found = []
    for row in range(inputs.shape[0]):
        used = segments[row] > 0
        assert np.all(used[: used.sum()]), "segments fill the row from the left"
        padding = [a[row][~used] for a in (inputs, targets, positions, mask)]
        assert not any(np.any(a) for a in padding), "padding is all zeros, with no loss"
        for segment in range(1, segments[row].max() + 1):
            where = segments[row] == segment
            assert np.array_equal(positions[row][where], np.arange(where.sum()))
            assert np.array_equal(targets[row][where][:-1], inputs[row][where][1:])
            tokens = (*inputs[row][where].tolist(), int(targets[row][where][-1]))
            found.append((tokens, tuple(targets[row][where][mask[row][where] > 0].tolist())))
    return found


def test_prompt_and_response_are_tokenized_separately(tok, words, tmp_path):
    prompt, response = f"User: say {words[0]} ", words[1]
    encode = lambda text: tok.encode([text])[0]
    # Joined, a merge across the boundary would change the response's first tokens.
    assert encode(prompt + response) != encode(prompt) + encode(response)
    record = {"prompt": prompt, "chosen": response, "rejected": words[2]}
    examples, _ = _load("preference", tok, _write(tmp_path, [record]), max_prompt_len=T - 2)
    assert examples[0]["prompt"].tolist() == [BOS, *encode(prompt)]
    assert examples[0]["chosen"].tolist() == [*encode(response), EOS]
    (batch,) = data.eval_batches(examples, "preference", seq_len=T, batch_size=1)
    ((tokens, masked),) = _segments({k: batch[k][:, 0] for k in ROW_KEYS})
    assert tokens == (BOS, *encode(prompt), *encode(response), EOS)
    assert masked == (*encode(response), EOS)  # the loss covers exactly the response and EOS


@pytest.mark.parametrize("kind", data.KINDS)
def test_loss_mask_is_the_response_and_eos_in_every_layout(kind, tok, words, tmp_path):
    encode = lambda text: tuple(tok.encode([text])[0])
    records = _records(kind, words, 6)
    examples, _ = _load(kind, tok, _write(tmp_path, records), seq_len=64, max_prompt_len=32)
    responses = [f for f in data.FIELDS[kind][1:] if f != "label"]
    expected = {
        ((BOS, *encode(r["prompt"]), *encode(r[f]), EOS), (*encode(r[f]), EOS))
        for r in records
        for f in responses
    }
    found = set()
    for batch in data.eval_batches(examples, kind, seq_len=64, batch_size=4):
        # KTO's second rows are the mismatched pairs, checked on their own below.
        rows = {k: batch[k][:, 0] if kind == "kto" else batch[k] for k in ROW_KEYS}
        found.update(_segments(rows))
    assert found == expected


def test_chat_messages_use_the_one_template(tok, tmp_path):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Goodbye"},
    ]
    prompt = "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello\n\nUser: Bye\n\nAssistant: "
    assert data.render_chat(messages) == (prompt, "Goodbye")
    path = _write(tmp_path, [{"messages": messages}])
    examples, _ = _load("sft", tok, path, seq_len=128, max_prompt_len=100)
    assert examples[0]["prompt"].tolist() == [BOS, *tok.encode([prompt])[0]]
    assert examples[0]["response"].tolist() == [*tok.encode(["Goodbye"])[0], EOS]


def test_truncation_keeps_the_prompt_end_and_the_response_start(tok, words, tmp_path):
    long_prompt, long_response = " ".join(words[:20]), " ".join(words[20:40])
    records = [{"prompt": long_prompt, "response": long_response}, {"prompt": "a", "response": "b"}]
    examples, report = _load("sft", tok, _write(tmp_path, records), max_prompt_len=8)
    prompt_ids, response_ids = tok.encode([long_prompt, long_response])
    assert examples[0]["prompt"].tolist() == [BOS, *prompt_ids[-8:]]
    assert examples[0]["response"].tolist() == response_ids[: T + 1 - 9]  # cut: no EOS
    assert examples[1]["response"].tolist()[-1] == EOS
    assert report["prompts_truncated"] == 1 and report["responses_truncated"] == 1
    assert report["examples_read"] == report["examples"] == 2 and report["dropped"] == {}


def test_pairs_identical_after_truncation_are_dropped_and_counted(tok, words, tmp_path):
    shared = " ".join(words[:30])
    records = [
        {"prompt": "q", "chosen": f"{shared} yes", "rejected": f"{shared} no"},  # differ when cut
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "yes", "rejected": "no"},
    ]
    examples, report = _load("preference", tok, _write(tmp_path, records))
    assert len(examples) == 1 and examples[0]["chosen"].tolist() == [*tok.encode(["yes"])[0], EOS]
    assert report["dropped"] == {"identical_chosen_and_rejected": 2}
    assert report["examples_read"] == 3 and report["responses_truncated"] == 2


def test_packing_keeps_every_example_once_across_shards(tok, words, tmp_path):
    examples, _ = _load("sft", tok, _write(tmp_path, _records("sft", words, 40)))
    expected = collections.Counter(
        ((*e["prompt"].tolist(), *e["response"].tolist()), tuple(e["response"].tolist()))
        for e in examples
    )
    found, counts = collections.Counter(), []
    for shard in range(2):
        shards = dict(shard_index=shard, shard_count=2)
        batches = list(data.eval_batches(examples, "sft", seq_len=T, batch_size=3, **shards))
        counts.append(len(batches))
        for batch in batches:
            assert set(batch) == {*ROW_KEYS, "valid"} and batch["valid"].shape == (3,)
            assert all(batch[k].shape == (3, T) and batch[k].dtype == np.int32 for k in ROW_KEYS)
            assert np.all(batch["segment_ids"].max(axis=1)[batch["valid"] == 0] == 0)
            found.update(_segments(batch))
    assert found == expected and counts[0] == counts[1]

    it = data.sft_iterator(examples, seq_len=T, batch_size=4, seed=3)
    batches = [next(it) for _ in range(40)]
    segments = [s for b in batches for s in _segments(b)]
    assert set(segments) == set(expected)  # each segment is one whole example; all were seen
    assert any(b["segment_ids"].max() > 1 for b in batches)  # several examples to a row


def test_preference_batches_hold_chosen_then_rejected(tok, words, tmp_path):
    examples, _ = _load("preference", tok, _write(tmp_path, _records("preference", words, 12)))

    def row_tokens(example, field):  # a cut response's final CUT is no target: padding there
        tokens = np.concatenate([example["prompt"], example[field]])
        return tuple(np.where(tokens == data.CUT, 0, tokens).tolist())

    by_tokens = {row_tokens(e, "chosen"): e for e in examples}
    batch = next(data.preference_iterator(examples, seq_len=T, batch_size=4, seed=1))
    assert set(batch) == set(ROW_KEYS)
    assert all(v.shape == (4, 2, T) and v.dtype == np.int32 for v in batch.values())
    for i in range(4):
        (chosen, _), (rejected, _) = _segments({k: batch[k][i] for k in ROW_KEYS})
        assert rejected == row_tokens(by_tokens[chosen], "rejected")


def test_kto_rows_pair_each_prompt_with_the_next_completion(tok, words, tmp_path):
    records = _records("kto", words, 8)
    # Fills its row behind an empty prompt, so it is cut where it follows another prompt.
    records[3].update(prompt="", completion=" ".join(words[:30]))
    examples, report = _load("kto", tok, _write(tmp_path, records))
    assert report["desirable"] == sum(r["label"] for r in records)
    by_tokens = {tuple(np.append(e["prompt"], e["completion"]).tolist()): e for e in examples}
    it, cut = data.kto_iterator(examples, seq_len=T, batch_size=4), 0
    for batch in [next(it) for _ in range(4)]:  # two epochs
        assert batch["label"].dtype == np.float32 and batch["label"].shape == (4,)
        rows = [_segments({k: batch[k][i] for k in ROW_KEYS}) for i in range(4)]
        matched = [by_tokens[tokens] for ((tokens, _), _) in rows]
        for i in range(4):
            prompt = matched[i]["prompt"].tolist()
            following = matched[(i + 1) % 4]["completion"].tolist()
            tokens = (prompt + following)[: T + 1]
            cut += len(prompt) + len(following) > T + 1
            assert rows[i][1] == (tuple(tokens), tuple(tokens[len(prompt) :]))
            assert batch["label"][i] == matched[i]["label"]
    assert cut > 0


def test_a_cut_preference_response_is_all_inputs_and_pairs_compare_what_they_read(tok, words, tmp_path):
    """A reward model reads a row's inputs up to the last response token: a cut response keeps
    only tokens its row holds as inputs, and a pair whose kept tokens agree is dropped."""
    shared = " ".join(words[:2])
    alike = {"chosen": f"{shared} yes", "rejected": f"{shared} no"}
    apart = {"chosen": f"yes {shared}", "rejected": f"no {shared}"}
    chosen_ids, rejected_ids = tok.encode(list(alike.values()))
    kept = next(i for i, (c, r) in enumerate(zip(chosen_ids, rejected_ids)) if c != r)
    # The prompt fills max_prompt_len + 1 tokens, so a response fits `kept` tokens and its EOS:
    # `alike` differs in the first token past what a cut response keeps.
    max_prompt_len = T - kept - 1
    prompt = " ".join(words[10:60])
    records = [{"prompt": prompt, **alike}, {"prompt": prompt, **apart}]
    examples, report = _load("preference", tok, _write(tmp_path, records), max_prompt_len=max_prompt_len)
    assert report["dropped"] == {"identical_chosen_and_rejected": 1} and report["responses_truncated"] == 4
    batch = next(data.eval_batches(examples, "preference", seq_len=T, batch_size=1))
    prompt_ids = [BOS, *tok.encode([prompt])[0][-max_prompt_len:]]
    for row, text in enumerate(apart.values()):
        response = tok.encode([text])[0][:kept]
        inputs, targets, segment_ids, positions, loss_mask = (batch[k][0, row] for k in ROW_KEYS)
        assert inputs.tolist() == prompt_ids + response and segment_ids.tolist() == [1] * T
        assert positions.tolist() == list(range(T))
        assert targets[loss_mask > 0].tolist() == response  # the last input has no target
        assert targets.tolist() == [*inputs[1:], 0]


@pytest.mark.parametrize("kind", data.KINDS)
def test_iterators_resume_exactly_from_their_state(kind, tok, words, tmp_path):
    examples, _ = _load(kind, tok, _write(tmp_path, _records(kind, words, 10)))
    make = lambda: data.train_iterator(examples, kind, seq_len=T, batch_size=4, seed=7)
    it = make()
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # as a checkpoint stores it
    expected = [next(it) for _ in range(4)]  # into the next epochs
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert got.keys() == want.keys() and all(np.array_equal(got[k], want[k]) for k in want)


def test_epochs_are_reshuffled_and_cover_the_shard(tok, words, tmp_path):
    examples, _ = _load("preference", tok, _write(tmp_path, _records("preference", words, 12)))
    it = data.preference_iterator(examples, seq_len=T, batch_size=4, seed=0)
    rows = lambda: [tuple(row) for _ in range(3) for row in next(it)["inputs"][:, 0].tolist()]
    epochs = [rows(), rows()]
    assert sorted(epochs[0]) == sorted(epochs[1]) and epochs[0] != epochs[1]
    assert len(set(epochs[0])) == 12


def test_attached_fields_flow_into_batches(tok, words, tmp_path):
    examples, _ = _load("preference", tok, _write(tmp_path, _records("preference", words, 5)))
    logps = np.arange(10, dtype=np.float32).reshape(5, 2)
    examples = data.with_field(examples, "reference_logps", logps)
    batches = list(data.eval_batches(examples, "preference", seq_len=T, batch_size=4))
    assert batches[0]["reference_logps"].dtype == np.float32
    in_order = np.concatenate([b["reference_logps"] for b in batches])
    np.testing.assert_array_equal(in_order, np.concatenate([logps, np.zeros((3, 2))]))  # padded
    # Keyed by the chosen tokens a row scores: all but a cut response's final CUT.
    index_of = {tuple(e["chosen"][e["chosen"] != data.CUT].tolist()): i for i, e in enumerate(examples)}
    batch = next(data.preference_iterator(examples, seq_len=T, batch_size=4, seed=2))
    for i in range(4):
        chosen = _segments({k: batch[k][i] for k in ROW_KEYS})[0][1]
        np.testing.assert_array_equal(batch["reference_logps"][i], logps[index_of[chosen]])
    with pytest.raises(ValueError, match="3 values of 'x' for 5 examples"):
        data.with_field(examples, "x", logps[:3])
    with pytest.raises(ValueError, match="field 'inputs' is already taken"):
        data.with_field(examples, "inputs", logps)
    sft_examples, _ = _load("sft", tok, _write(tmp_path, _records("sft", words, 5)))
    sft_examples = data.with_field(sft_examples, "reference_logps", logps)
    with pytest.raises(ValueError, match=r"SFT examples carry \['reference_logps'\]"):
        data.sft_iterator(sft_examples, seq_len=T, batch_size=2)


@pytest.mark.parametrize("kind", ("preference", "kto"))
def test_eval_batches_cover_the_examples_once_in_order_across_processes(kind, tok, words, tmp_path):
    examples, _ = _load(kind, tok, _write(tmp_path, _records(kind, words, 7)))
    args = dict(seq_len=T, batch_size=2, shard_count=3)
    shards = [list(data.eval_batches(examples, kind, shard_index=p, **args)) for p in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    # Gathered as the processes' batches in process order, global batch after global batch.
    gather = lambda key: np.concatenate([shard[g][key] for g in range(2) for shard in shards])
    inputs, valid = gather("inputs"), gather("valid")
    assert valid.tolist() == [1] * 7 + [0] * 5
    response = data.FIELDS[kind][1]
    for example, row in zip(examples, inputs[:7, 0]):
        tokens = np.concatenate([example["prompt"], example[response]])
        assert row.tolist() == [*tokens[:-1], *[0] * (T + 1 - tokens.size)]
    assert not np.any(gather("loss_mask")[valid == 0])
    assert not np.any(gather("segment_ids")[valid == 0])


def test_kto_eval_rows_take_the_next_completion_of_the_whole_set(tok, words, tmp_path):
    """The last eval batch holds one example: its mismatched row takes the first example's
    completion, not its own."""
    examples, _ = _load("kto", tok, _write(tmp_path, _records("kto", words, 5)))
    batches = list(data.eval_batches(examples, "kto", seq_len=T, batch_size=4))
    assert [b["valid"].tolist() for b in batches] == [[1, 1, 1, 1], [1, 0, 0, 0]]
    mismatched = np.concatenate([b["inputs"][:, 1] for b in batches])[:5]
    for i, row in enumerate(mismatched):
        tokens = np.concatenate([examples[i]["prompt"], examples[(i + 1) % 5]["completion"]])[: T + 1]
        assert row.tolist() == [*tokens[:-1], *[0] * (T + 1 - tokens.size)]
    with pytest.raises(ValueError, match=r"1 kto example: KTO's mismatched pairs need 2 examples"):
        list(data.eval_batches(examples[:1], "kto", seq_len=T, batch_size=4))


BAD_LINES = [
    ("sft", "{not json", r"invalid JSON"),
    ("sft", '["a list"]', r"a JSON object is expected, not list"),
    ("sft", {"prompt": "a"}, r"no field 'response' \(found: prompt\)"),
    ("sft", {"prompt": 1, "response": "b"}, r"field 'prompt' is int, not a string"),
    ("sft", {"prompt": "a", "response": ""}, r"field 'response' is empty"),
    ("sft", {"messages": "hi"}, r"field 'messages' is str, not a list"),
    ("sft", {"messages": []}, r"field 'messages' is empty"),
    ("sft", {"messages": [{"role": "assistant"}]}, r"field 'messages\[0\]' needs role and content"),
    (
        "sft",
        {"messages": [{"role": "robot", "content": "x"}]},
        r"field 'messages\[0\].role' is 'robot', not one of system, user, assistant",
    ),
    (
        "sft",
        {"messages": [{"role": "user", "content": "q"}]},
        r"field 'messages' ends with a 'user' message",
    ),
    (
        "sft",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
        r"field 'messages\[1\].content' is empty",
    ),
    ("preference", {"prompt": "a", "chosen": "b"}, r"no field 'rejected'"),
    ("preference", {"prompt": "a", "chosen": "", "rejected": "c"}, r"field 'chosen' is empty"),
    ("preference", {"prompt": "a", "chosen": "b", "rejected": ["c"]}, r"field 'rejected' is list"),
    ("kto", {"prompt": "a", "label": True}, r"no field 'completion'"),
    ("kto", {"prompt": "a", "completion": "", "label": True}, r"field 'completion' is empty"),
    ("kto", {"prompt": "a", "completion": "b", "label": 1}, r"field 'label' is int, not a bool"),
]


@pytest.mark.parametrize("kind, line, message", BAD_LINES)
def test_bad_input_names_file_line_and_field(kind, line, message, tok, words, tmp_path):
    path = _write(tmp_path, [_records(kind, words, 1)[0], "", line], name="bad.jsonl")
    with pytest.raises(ValueError, match=rf"bad\.jsonl:3: {message}"):
        _load(kind, tok, path)


def test_requests_that_cannot_be_served_are_refused(tok, words, tmp_path):
    path = _write(tmp_path, _records("kto", words, 3))
    with pytest.raises(ValueError, match=r"max_prompt_len=24 must be in \[1, 24\) for kto data at seq_len=24"):
        _load("kto", tok, path, max_prompt_len=T)
    # A cut preference response keeps one token fewer: at T - 1 it would keep none.
    with pytest.raises(ValueError, match=r"max_prompt_len=23 must be in \[1, 23\) for preference data"):
        _load("preference", tok, _write(tmp_path, _records("preference", words, 3), "pairs.jsonl"), max_prompt_len=T - 1)
    with pytest.raises(ValueError, match=r"missing\.jsonl: no such file"):
        _load("kto", tok, str(tmp_path / "missing.jsonl"))
    examples, _ = _load("kto", tok, path)
    with pytest.raises(ValueError, match=r"shard 3 of 4 gets 0 of the 3 kto examples"):
        data.kto_iterator(examples, seq_len=T, batch_size=2, shard_index=3, shard_count=4)
    with pytest.raises(ValueError, match=r"gets 3 of the 3 kto examples, fewer than batch_size=4"):
        data.kto_iterator(examples, seq_len=T, batch_size=4)
    with pytest.raises(ValueError, match=r"batch_size=1: KTO's mismatched pairs need 2"):
        data.kto_iterator(examples, seq_len=T, batch_size=1)
    long_record = {"prompt": "", "completion": " ".join(words), "label": True}
    long_examples, _ = _load("kto", tok, _write(tmp_path, [long_record]), seq_len=64)
    with pytest.raises(ValueError, match=r"an example has 65 tokens, more than seq_len \+ 1 = 25"):
        list(data.eval_batches(long_examples, "kto", seq_len=T, batch_size=1))


def test_hugging_face_dataset_reads_like_jsonl(tok, words, tmp_path):
    datasets = pytest.importorskip("datasets")
    records = _records("preference", words, 4)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "pairs"))
    from_hf, _ = _load("preference", tok, str(tmp_path / "pairs"))
    from_jsonl, _ = _load("preference", tok, _write(tmp_path, records))
    for a, b in zip(from_hf, from_jsonl, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    records[2]["rejected"] = ""
    bad = datasets.DatasetDict(test=datasets.Dataset.from_list(records))
    bad.save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(ValueError, match=r"bad: row 2: field 'rejected' is empty"):
        _load("preference", tok, str(tmp_path / "bad"), split="eval")
    with pytest.raises(ValueError, match=r"bad: no split 'train' \(found: test\)"):
        _load("preference", tok, str(tmp_path / "bad"))
