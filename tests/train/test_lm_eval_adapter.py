"""The lm-evaluation-harness model `lmx` on a tiny trained run: its scores equal the model's
own log-probs, long documents are scored in lm_eval's rolling windows, generation stops at
the stop strings, and a local lm_eval task runs end to end offline."""

import json
import textwrap

import jax
import numpy as np
import pytest

pytest.importorskip("lm_eval")

import model  # noqa: E402
from model.generate import generate  # noqa: E402
from tests.train.tiny_experiment import tiny_config, write_tiny_corpus  # noqa: E402
from train import pretrain  # noqa: E402
from train.lm_eval_adapter import LmxLM  # noqa: E402


class _Request:
    """What the adapter reads of an `lm_eval.api.instance.Instance`."""

    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    cfg = tiny_config(write_tiny_corpus(tmp_path_factory.mktemp("corpus")), tmp_path_factory.mktemp("cache"), steps=4)
    cfg.optimizer.warmup_steps = 2
    cfg.sample.max_new_tokens = 2
    pretrain.run(cfg, workdir)
    return LmxLM(workdir=str(workdir), batch_size=8)


def _direct_logprob(adapter, tokens, scored):
    """Sum of float32 log_softmax of `model.forward` over the last `scored` tokens, and
    whether each of them is the argmax; the sequence alone in one row on one device, padded
    at the end to the window (which a causal model cannot see, and which makes every call one
    compiled shape)."""
    params = jax.device_get(adapter.params)
    inputs = np.zeros((1, adapter.max_length), np.int32)
    inputs[0, : len(tokens) - 1] = tokens[:-1]
    logits = np.asarray(model.forward(adapter.config, params, inputs), np.float32)[0]
    logp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
    positions = np.arange(len(tokens) - 1 - scored, len(tokens) - 1)
    targets = np.asarray(tokens)[positions + 1]
    return float(np.sum(logp[positions, targets])), bool(np.all(logits[positions].argmax(-1) == targets))


def test_loglikelihood_equals_the_models_own_scores(adapter):
    bos = adapter.tokenizer.bos_id
    pairs = [("import os", "\nimport sys"), ("def f(x):", " return x"), ("", "class A:"), ("x = ", "1")]
    results = adapter.loglikelihood([_Request(*pair) for pair in pairs])
    for (context, continuation), (logp, greedy) in zip(pairs, results):
        # lm_eval's convention: a context's trailing spaces belong to the continuation.
        context, continuation = context.rstrip(), context[len(context.rstrip()):] + continuation
        context_ids = adapter.tokenizer.encode([context])[0]
        continuation_ids = adapter.tokenizer.encode([context + continuation])[0][len(context_ids):]
        expected = _direct_logprob(adapter, [bos] + context_ids + continuation_ids, len(continuation_ids))
        assert logp == pytest.approx(expected[0], abs=1e-4)
        assert greedy == expected[1]
    assert all(logp < 0 for logp, _ in results)

    # A greedy continuation of a context is flagged as greedy.
    prompt = [bos] + adapter.tokenizer.encode(["import "])[0]
    continuation = generate(adapter.config, jax.device_get(adapter.params), [prompt], max_new_tokens=12).tokens[0]
    assert adapter._loglikelihood_tokens([(None, prompt, continuation)])[0][1] is True


def test_rolling_loglikelihood_covers_every_token_once(adapter):
    window = adapter.max_length
    assert window == 32  # the tiny run's train.seq_len
    short = "import os\nprint(os.getcwd())\n"
    short_ids = adapter.tok_encode(short, add_special_tokens=False)
    assert len(short_ids) < window
    [rolling] = adapter.loglikelihood_rolling([_Request(short)])
    expected, _ = _direct_logprob(adapter, [adapter.tokenizer.bos_id] + short_ids, len(short_ids))
    assert rolling == pytest.approx(expected, abs=1e-4)

    # Longer than the window: the first window predicts its tokens after BOS; each later one
    # predicts up to `window` new tokens, conditioned on the tokens just before them.
    long = "def add(a, b):\n    return a + b\n\n" * 5
    ids = adapter.tok_encode(long, add_special_tokens=False)
    assert 2 * window < len(ids) < 3 * window
    [rolling] = adapter.loglikelihood_rolling([_Request(long)])
    tokens = [adapter.tokenizer.bos_id] + ids  # tokens[k + 1] == ids[k]
    expected, predicted = _direct_logprob(adapter, tokens[: window + 1], window)[0], window
    while predicted < len(ids):
        end = min(predicted + window, len(ids))
        expected += _direct_logprob(adapter, tokens[end - window : end + 1], end - predicted)[0]
        predicted = end
    assert rolling == pytest.approx(expected, abs=1e-3)


def test_generate_until_stops_at_the_stop_string(adapter):
    prompt = "import "
    tokens = [adapter.tokenizer.bos_id] + adapter.tokenizer.encode([prompt])[0]
    [full_ids] = generate(adapter.config, jax.device_get(adapter.params), [tokens], max_new_tokens=12).tokens
    full = adapter.tokenizer.decode([full_ids])[0]
    stop = full[len(full) // 2:][:2]
    assert stop
    cut, capped = adapter.generate_until([
        _Request(prompt, {"until": [stop, "never"], "max_gen_toks": 12}),
        _Request(prompt, {"until": [], "max_gen_toks": 9, "do_sample": False}),
    ])
    assert cut == full[: full.index(stop)]
    assert capped == adapter.tokenizer.decode([full_ids[:9]])[0]


def test_a_local_lm_eval_task_runs_end_to_end_offline(adapter, tmp_path, monkeypatch):
    import lm_eval
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    docs = [
        {"question": "import", "choices": ["os", "zzz"], "answer": 0},
        {"question": "def f(x):\n    return", "choices": ["x", "]]]"], "answer": 0},
        {"question": "class A", "choices": [":", "("], "answer": 1},
        {"question": "for i in", "choices": ["range(3):", "12345"], "answer": 0},
    ]
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (tmp_path / "lmx_local.yaml").write_text(textwrap.dedent(f"""
        task: lmx_local
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {data}
          cache_dir: {tmp_path / "hf_cache"}
        test_split: test
        output_type: multiple_choice
        doc_to_text: "{{{{question}}}}"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: answer
        metric_list:
          - metric: acc
    """))
    out = lm_eval.simple_evaluate(
        model=adapter, tasks=["lmx_local"], task_manager=TaskManager(include_path=str(tmp_path), include_defaults=False),
        bootstrap_iters=0, log_samples=False,
    )
    accuracy = out["results"]["lmx_local"]["acc,none"]

    # Independently: the choice with the higher log-likelihood after a space delimiter.
    scores = adapter.loglikelihood([_Request(d["question"], " " + c) for d in docs for c in d["choices"]])
    picks = [int(np.argmax([scores[2 * i][0], scores[2 * i + 1][0]])) for i in range(len(docs))]
    assert accuracy == pytest.approx(np.mean([p == d["answer"] for p, d in zip(picks, docs)]))
