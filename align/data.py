"""Post-training data: SFT, preference and KTO examples, tokenized and batched with grain.

    examples, report = data.load("preference", cfg, tokenizer, split="train", seq_len=T)
    examples = data.with_field(examples, "reference_logps", logps_N2)  # optional, per example
    it = data.train_iterator(examples, "preference", seq_len=T, batch_size=B, seed=0)
    for batch in data.eval_batches(examples, "preference", seq_len=T, batch_size=B): ...

An example's row is [BOS] prompt response [EOS], with prompt and response tokenized separately:
a BPE merge across the joined string would let the prompt change the response's first tokens
and blur where the loss starts. As in pretraining, inputs = row[:-1] and targets = row[1:];
loss_mask[t] is 1 exactly where targets[t] is a response token or the EOS that ends it.

Rows hold at most seq_len + 1 tokens. The prompt keeps its last max_prompt_len tokens (the end is
what the response answers) and the response its start; a cut response loses its EOS, since it
did not end there. A reward model reads a preference row's inputs up to its last response token,
which a cut response's row would hold only as a target: so a cut preference response keeps one
token fewer and ends with CUT in place of EOS, and its row has that token as its last input, with
no target. As max_prompt_len < seq_len (seq_len - 1 for preference data, whose cut responses
keep one token fewer), every example keeps at least one response token. A
preference pair whose chosen and rejected read the same tokens after truncation (all but the
final EOS or CUT) carries no signal for a reward model and is dropped. The report of `load`
counts truncations and drops.

Batches, int32 unless stated (B batch, T seq_len). Padding is all zeros: the PAD id 0, segment
id 0, position 0, no loss.
  sft         inputs, targets, segment_ids, positions, loss_mask [B, T]: examples packed several
              to a row as in data/packing.py, segment ids 1, 2, ... and positions from 0 per example
  preference  the same keys [B, 2, T], one example per row, right-padded; 0 chosen, 1 rejected
  kto         the same keys [B, 2, T]: 0 is (prompt i, completion i), 1 the mismatched
              (prompt i, completion i+1 mod B) whose log-ratio estimates KTO's reference point,
              as TRL does; in eval batches i+1 is of the whole set (mod its size), as an eval
              batch may hold a single example; label float32 [B], 1 desirable
Fields attached with `with_field` come stacked as [B, ...] (preference and KTO). Eval batches add
`valid` [B]: 1 for a row of data, 0 for a padding row.
"""

import collections
import functools
import pathlib
from collections.abc import Iterator, Sequence

import grain
import ml_collections
import numpy as np

from data import packing, sources
from data.tokenizer import PAD_ID, Tokenizer

KINDS = ("sft", "preference", "kto")
# Fields of a tokenized example; any other field was attached by `with_field`.
FIELDS = {
    "sft": ("prompt", "response"),
    "preference": ("prompt", "chosen", "rejected"),
    "kto": ("prompt", "completion", "label"),
}
_RESPONSES = {"sft": ("response",), "preference": ("chosen", "rejected"), "kto": ("completion",)}
_EXPECTED = {
    "sft": "prompt and response strings, or messages",
    "preference": "prompt, chosen and rejected strings",
    "kto": "prompt and completion strings and a bool label",
}
ROW_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
# Ends a preference response cut to fit, in place of EOS; no token id is negative.
CUT = np.int32(-1)
CHAT_HEADERS = {"system": "System: ", "user": "User: ", "assistant": "Assistant: "}
_TURN_END = "\n\n"
_JSONL_SUFFIXES = (".jsonl", ".json")
# Examples are in memory and a batch is a few small numpy copies: reader threads only add locking.
_READ_IN_PLACE = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def default_config() -> ml_collections.ConfigDict:
    """Each field is explained in place."""
    cfg = ml_collections.ConfigDict()
    # Entries: a JSONL file (suffix .jsonl or .json, one example per line), a directory written
    # by `datasets`' save_to_disk, or else the name of a Hugging Face hub dataset. The fields
    # each kind needs are listed in `load`.
    cfg.train_paths = ()
    cfg.eval_paths = ()  # () for no evaluation examples
    cfg.hf_split = "train"  # split of a hub dataset or saved DatasetDict in train_paths
    cfg.hf_eval_split = "test"  # the same for eval_paths
    cfg.max_prompt_len = 256  # prompt tokens kept (its end); below seq_len, to leave room
    return cfg


def render_chat(messages: Sequence[dict]) -> tuple[str, str]:
    """(prompt, response) of a conversation whose last message is the assistant's response.

    The one chat template. The tokenizer has no special tokens, so a turn is a plain-text
    header, its content and a blank line ("User: hi\\n\\n"); the prompt ends with the assistant's
    header, which is also how to prompt a conversation for generation.
    """
    turns = "".join(CHAT_HEADERS[m["role"]] + m["content"] + _TURN_END for m in messages[:-1])
    return turns + CHAT_HEADERS["assistant"], messages[-1]["content"]


def load(
    kind: str, cfg, tokenizer: Tokenizer, *, split: str = "train", seq_len: int
) -> tuple[list[dict[str, np.ndarray]], dict]:
    """(examples, report) of cfg.train_paths or cfg.eval_paths, tokenized to fit seq_len.

    Fields of each record (a JSONL line or a dataset row):
      sft         prompt and response, or messages: [{role, content}, ...] with roles system,
                  user, assistant, ending with the assistant's response (see render_chat)
      preference  prompt, chosen, rejected (the Anthropic HH / UltraFeedback convention)
      kto         prompt, completion, label (true: desirable)
    A prompt may be empty; a response, chosen, rejected or completion may not. An example is a
    dict of int32 arrays: prompt ([BOS] and the kept prompt tokens) and each response's kept
    tokens (with EOS unless cut; a cut preference response ends with CUT), plus KTO's float32
    label.
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    if split not in ("train", "eval"):
        raise ValueError(f"split={split!r} is not 'train' or 'eval'")
    limit = seq_len - 1 if kind == "preference" else seq_len  # a cut preference response keeps one token fewer
    if not 0 < cfg.max_prompt_len < limit:
        raise ValueError(
            f"max_prompt_len={cfg.max_prompt_len} must be in [1, {limit}) for {kind} data at seq_len={seq_len}: "
            "the prompt must leave room for a response token"
        )
    paths = cfg.train_paths if split == "train" else cfg.eval_paths
    if split == "train" and not paths:
        raise ValueError("train_paths is empty: name JSONL files or Hugging Face datasets")
    split_field = "hf_split" if split == "train" else "hf_eval_split"
    records = [
        record for path in paths
        for record in _records(str(path), cfg[split_field], f"data.{split_field}")
    ]
    texts = [_parse(kind, where, record) for where, record in records]
    examples, counts = _tokenize(kind, texts, tokenizer, cfg.max_prompt_len, seq_len)
    report = {
        "kind": kind,
        "split": split,
        "paths": [str(p) for p in paths],
        "examples_read": len(texts),
        "examples": len(examples),
        **counts,
        "tokens": sum(int(np.sum(e[f] != CUT)) for e in examples for f in ("prompt", *_RESPONSES[kind])),
        "max_prompt_len": cfg.max_prompt_len,
        "seq_len": seq_len,
    }
    if kind == "kto":
        report["desirable"] = int(sum(e["label"] for e in examples))
    return examples, report


def _records(location: str, hf_split: str, split_key: str) -> Iterator[tuple[str, dict]]:
    """(where, record) of every example; `where` names the file and line, or dataset and row."""
    if pathlib.Path(location).suffix.lower() in _JSONL_SUFFIXES:
        yield from _jsonl_records(pathlib.Path(location))
    else:
        yield from _hf_records(location, hf_split, split_key)


def _jsonl_records(path: pathlib.Path) -> Iterator[tuple[str, dict]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such file")
    for number, record in sources.jsonl_records(path, path.read_text(encoding="utf-8")):
        where = f"{path}:{number}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: a JSON object is expected, not {type(record).__name__}")
        yield where, record


def _hf_records(location: str, split: str, split_key: str) -> Iterator[tuple[str, dict]]:
    for row, record in enumerate(sources.load_hf_dataset(location, split, split_key)):
        yield f"{location}: row {row}", record


def _parse(kind: str, where: str, record: dict) -> dict:
    """The record's checked texts (and KTO's label)."""
    if kind == "sft" and "messages" in record:
        prompt, response = render_chat(_messages(where, record["messages"]))
        return {"prompt": prompt, "response": response}
    for field in FIELDS[kind]:
        if field not in record:
            found = ", ".join(record)
            raise ValueError(
                f"{where}: no field {field!r} (found: {found}); {kind} needs {_EXPECTED[kind]}"
            )
    texts = {"prompt": _text(where, "prompt", record["prompt"], allow_empty=True)}
    texts.update((field, _text(where, field, record[field])) for field in _RESPONSES[kind])
    if kind == "kto":
        label = record["label"]
        if not isinstance(label, bool):
            raise ValueError(f"{where}: field 'label' is {type(label).__name__}, not a bool")
        texts["label"] = label
    return texts


def _text(where: str, field: str, value, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{where}: field {field!r} is {type(value).__name__}, not a string")
    if not value and not allow_empty:
        raise ValueError(f"{where}: field {field!r} is empty")
    return value


def _messages(where: str, messages) -> list[dict]:
    """The conversation's messages, checked; the last is the assistant's non-empty response."""
    if not isinstance(messages, list) or not messages:
        found = "empty" if isinstance(messages, list) else f"{type(messages).__name__}, not a list"
        raise ValueError(f"{where}: field 'messages' is {found}")
    checked = []
    for i, message in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(message, dict) or not {"role", "content"} <= message.keys():
            found = ", ".join(message) if isinstance(message, dict) else type(message).__name__
            raise ValueError(f"{where}: field {field!r} needs role and content (found: {found})")
        role = message["role"]
        if role not in CHAT_HEADERS:
            roles = ", ".join(CHAT_HEADERS)
            raise ValueError(f"{where}: field '{field}.role' is {role!r}, not one of {roles}")
        is_response = i == len(messages) - 1
        content = _text(where, f"{field}.content", message["content"], allow_empty=not is_response)
        checked.append({"role": role, "content": content})
    if checked[-1]["role"] != "assistant":
        raise ValueError(
            f"{where}: field 'messages' ends with a {checked[-1]['role']!r} message; the last "
            "must be the assistant's response"
        )
    return checked


def _tokenize(kind, texts, tokenizer, max_prompt_len, seq_len) -> tuple[list[dict], dict]:
    """(examples, counts of truncated prompts and responses and of dropped examples by reason)."""
    prompts = tokenizer.encode_arrays([t["prompt"] for t in texts])
    responses = {f: tokenizer.encode_arrays([t[f] for t in texts]) for f in _RESPONSES[kind]}
    bos, eos = np.int32(tokenizer.bos_id), np.int32(tokenizer.eos_id)
    prompts_truncated = responses_truncated = 0
    dropped = collections.Counter()
    examples = []
    for i, text in enumerate(texts):
        prompts_truncated += prompts[i].size > max_prompt_len
        example = {"prompt": np.concatenate([[bos], prompts[i][-max_prompt_len:]]).astype(np.int32)}
        room = seq_len + 1 - example["prompt"].size  # at least 1, as max_prompt_len < seq_len
        for field in _RESPONSES[kind]:
            response = np.append(responses[field][i], eos).astype(np.int32)
            is_cut = response.size > room
            responses_truncated += is_cut
            if is_cut and kind == "preference":
                response = np.append(response[: room - 1], CUT)
            example[field] = response[:room]
        # What a reward model reads: all but the final EOS or CUT.
        if kind == "preference" and np.array_equal(example["chosen"][:-1], example["rejected"][:-1]):
            dropped["identical_chosen_and_rejected"] += 1
            continue
        if kind == "kto":
            example["label"] = np.float32(text["label"])
        examples.append(example)
    counts = {
        "prompts_truncated": int(prompts_truncated),
        "responses_truncated": int(responses_truncated),
        "dropped": dict(dropped),
    }
    return examples, counts


def with_field(examples: list[dict], name: str, values) -> list[dict]:
    """Copies of the examples with values[i] attached to example i as `name`; batches stack it
    as [B, ...] (e.g. reference_logps float32 [N, 2] -> [B, 2])."""
    values = np.asarray(values)
    if len(values) != len(examples):
        raise ValueError(f"{len(values)} values of {name!r} for {len(examples)} examples")
    taken = set(ROW_KEYS) | {"label", "valid"} | (examples[0].keys() if examples else set())
    if name in taken:
        raise ValueError(f"field {name!r} is already taken in the examples or their batches")
    return [{**example, name: value} for example, value in zip(examples, values)]


def _check_request(kind, examples, seq_len, batch_size, shard_index, shard_count, seed=0) -> None:
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    packing.check_request(seq_len, batch_size, shard_index, shard_count, seed)
    extra = sorted(set(examples[0]) - set(FIELDS[kind])) if examples else []
    if kind == "sft" and extra:
        raise ValueError(
            f"SFT examples carry {extra}: a packed row holds several examples, so per-example "
            "fields have no place in its batch"
        )
    lengths = (e["prompt"].size + e[f].size for e in examples for f in _RESPONSES[kind])
    longest = max(lengths, default=0)
    if longest > seq_len + 1:
        raise ValueError(
            f"an example has {longest} tokens, more than seq_len + 1 = {seq_len + 1}: load the "
            "examples with the seq_len of the batches"
        )


def _shard(kind, examples, batch_size, shard_index, shard_count) -> grain.MapDataset:
    """Process shard_index's examples: every shard_count-th one."""
    shard = grain.MapDataset.source(examples)[shard_index::shard_count]
    if len(shard) < batch_size:
        raise ValueError(
            f"shard {shard_index} of {shard_count} gets {len(shard)} of the {len(examples)} {kind} "
            f"examples, fewer than batch_size={batch_size}"
        )
    return shard


def sft_iterator(
    examples, *, seq_len: int, batch_size: int, seed: int = 0, shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Endless packed SFT batches, reshuffled every epoch (grain folds the epoch into `seed`);
    `get_state()` / `set_state()` resume exactly, given the same examples and arguments."""
    _check_request("sft", examples, seq_len, batch_size, shard_index, shard_count, seed)
    shard = _shard("sft", examples, batch_size, shard_index, shard_count)
    dataset = shard.shuffle(seed=seed).repeat().map(_sft_columns).to_iter_dataset(_READ_IN_PLACE)
    dataset = packing.pack(dataset, "columns", seq_len, PAD_ID, seed, shuffle_bins=True)
    return iter(dataset.batch(batch_size, drop_remainder=True).map(_split_columns))


def preference_iterator(
    examples, *, seq_len: int, batch_size: int, seed: int = 0, shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Endless preference batches, reshuffled every epoch (an epoch's last partial batch is
    dropped); `get_state()` / `set_state()` resume exactly."""
    shards = shard_index, shard_count
    return _paired_iterator("preference", examples, seq_len, batch_size, seed, *shards)


def kto_iterator(
    examples, *, seq_len: int, batch_size: int, seed: int = 0, shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """Endless KTO batches, as preference_iterator; batch_size >= 2 so that the mismatched
    completions come from other examples."""
    if batch_size < 2:
        raise ValueError(f"batch_size={batch_size}: KTO's mismatched pairs need 2 examples a batch")
    shards = shard_index, shard_count
    return _paired_iterator("kto", examples, seq_len, batch_size, seed, *shards)


def _paired_iterator(kind, examples, seq_len, batch_size, seed, shard_index, shard_count):
    _check_request(kind, examples, seq_len, batch_size, shard_index, shard_count, seed)
    shard = _shard(kind, examples, batch_size, shard_index, shard_count)
    batch_fn = functools.partial(_BATCH_FNS[kind], seq_len=seq_len)
    # Batched before repeat: grain batches each epoch separately, so no batch spans two epochs
    # (where an example could meet itself).
    dataset = shard.shuffle(seed=seed).batch(batch_size, drop_remainder=True, batch_fn=batch_fn)
    return iter(dataset.repeat().to_iter_dataset(_READ_IN_PLACE))


def train_iterator(
    examples, kind: str, *, seq_len: int, batch_size: int, seed: int = 0, shard_index: int = 0,
    shard_count: int = 1,
) -> grain.DatasetIterator:
    """The endless training iterator of `kind`: sft_, preference_ or kto_iterator."""
    iterators = {"sft": sft_iterator, "preference": preference_iterator, "kto": kto_iterator}
    if kind not in iterators:
        raise ValueError(f"kind={kind!r} is not one of {KINDS}")
    return iterators[kind](
        examples, seq_len=seq_len, batch_size=batch_size, seed=seed, shard_index=shard_index,
        shard_count=shard_count,
    )


def eval_batches(
    examples, kind: str, *, seq_len: int, batch_size: int, shard_index: int = 0,
    shard_count: int = 1,
) -> Iterator[dict[str, np.ndarray]]:
    """One ordered pass over the examples across all processes, each batch with `valid` [B].

    The units are the examples (for SFT, the rows they pack into, in order). Global batch g
    holds units g·B·P to (g+1)·B·P - 1 (P = shard_count), process p its p-th block of B, so the
    processes' batches gathered in process order list the units in order. Every process yields
    the same number of batches (a collective step waits for all); rows past the end are
    padding: valid 0 and all zeros, so their loss_mask is 0 too.
    """
    _check_request(kind, examples, seq_len, batch_size, shard_index, shard_count)
    if kind == "sft":
        in_order = grain.MapDataset.source(examples).map(_sft_columns)
        in_order = in_order.to_iter_dataset(_READ_IN_PLACE)
        units = list(packing.pack(in_order, "columns", seq_len, PAD_ID, seed=0, shuffle_bins=False))
        make_batch = lambda rows: _split_columns(_stack(rows))
    elif kind == "kto":
        if len(examples) == 1:
            raise ValueError("1 kto example: KTO's mismatched pairs need 2 examples")
        # Each example with the next of the whole set, whose completion its mismatched row takes:
        # the next of its batch would be itself in a batch that holds one example.
        units = list(zip(examples, examples[1:] + examples[:1]))
        make_batch = lambda pairs: _kto_batch(*zip(*pairs), seq_len=seq_len)
    else:
        units = examples
        make_batch = functools.partial(_preference_batch, seq_len=seq_len)
    per_global_batch = batch_size * shard_count
    for start in range(0, len(units), per_global_batch):
        first = start + shard_index * batch_size
        block = units[first : first + batch_size]
        # A process past the end still builds a batch (from the first unit) for its shapes.
        yield _padded(make_batch(block or units[:1]), len(block), batch_size)


def _padded(batch: dict[str, np.ndarray], valid: int, batch_size: int) -> dict[str, np.ndarray]:
    """The batch's first `valid` rows, then all-zero rows up to batch_size, and `valid` [B]."""
    padded = {}
    for key, value in batch.items():
        padded[key] = np.zeros((batch_size, *value.shape[1:]), value.dtype)
        padded[key][:valid] = value[:valid]
    padded["valid"] = (np.arange(batch_size) < valid).astype(np.int32)
    return padded


def _sft_columns(example: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{"columns": int32 [n, 3]}: input, target and loss mask of the example's n positions.

    One feature rather than three, so that the packer places one array per example.
    """
    tokens = np.concatenate([example["prompt"], example["response"]])
    columns = np.zeros((tokens.size - 1, 3), np.int32)
    columns[:, 0], columns[:, 1] = tokens[:-1], tokens[1:]
    columns[example["prompt"].size - 1 :, 2] = 1  # targets from the first response token on
    return {"columns": columns}


def _split_columns(packed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    columns = packed["columns"]
    return {
        "inputs": np.ascontiguousarray(columns[..., 0]),
        "targets": np.ascontiguousarray(columns[..., 1]),
        "segment_ids": packed["columns_segment_ids"],
        "positions": packed["columns_positions"],
        "loss_mask": np.ascontiguousarray(columns[..., 2]),
    }


def _row(prompt: np.ndarray, response: np.ndarray, seq_len: int) -> dict[str, np.ndarray]:
    """One right-padded row of prompt (from BOS) and response, the response cut to fit; a
    response ending with CUT has its last token as the last input, with no target."""
    tokens = np.concatenate([prompt, response])[: seq_len + 1]
    n = tokens.size - 1
    row = {key: np.zeros(seq_len, np.int32) for key in ROW_KEYS}
    row["inputs"][:n], row["targets"][:n] = tokens[:-1], tokens[1:]
    row["segment_ids"][:n] = 1
    row["positions"][:n] = np.arange(n)
    row["loss_mask"][prompt.size - 1 : n] = 1
    if tokens[-1] == CUT:
        row["targets"][n - 1] = row["loss_mask"][n - 1] = 0
    return row


def _stack(rows: Sequence[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {key: np.stack([row[key] for row in rows]) for key in rows[0]}


def _stack_pairs(pairs: list[tuple[dict, dict]]) -> dict[str, np.ndarray]:
    """[B, 2, T] arrays from B (row 0, row 1) pairs."""
    return {key: np.stack([[a[key], b[key]] for a, b in pairs]) for key in ROW_KEYS}


def _extras(examples: Sequence[dict], kind: str) -> dict[str, np.ndarray]:
    """The fields attached with `with_field`, stacked."""
    return {k: np.stack([e[k] for e in examples]) for k in examples[0] if k not in FIELDS[kind]}


def _preference_batch(examples: Sequence[dict], seq_len: int) -> dict[str, np.ndarray]:
    pairs = [
        (_row(e["prompt"], e["chosen"], seq_len), _row(e["prompt"], e["rejected"], seq_len))
        for e in examples
    ]
    return {**_stack_pairs(pairs), **_extras(examples, "preference")}


def _kto_batch(
    examples: Sequence[dict], following: Sequence[dict] | None = None, *, seq_len: int
) -> dict[str, np.ndarray]:
    """Row 1 of example i: its prompt with following[i]'s completion, cut to fit; by default
    following[i] is example i+1 of the batch (mod its size).

    Built here from the separately tokenized parts, so the mismatched rows change with every
    reshuffle, as the matched ones do.
    """
    examples = list(examples)
    if following is None:
        following = examples[1:] + examples[:1]
    pairs = [
        (_row(e["prompt"], e["completion"], seq_len), _row(e["prompt"], f["completion"], seq_len))
        for e, f in zip(examples, following)
    ]
    label = np.array([e["label"] for e in examples], np.float32)
    return {**_stack_pairs(pairs), "label": label, **_extras(examples, "kto")}


_BATCH_FNS = {"preference": _preference_batch, "kto": _kto_batch}
