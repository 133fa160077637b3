"""Generation: greedy against the full forward, padding, EOS, log-probs, filters, beams, reuse."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import model
from model import generate as gen
from model.generate import Sampling, beam_search, generate, next_token
from model.logprobs import target_logprobs

CONFIG = model.get_config("llama-tiny", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128, max_seq_len=64)
GPT2 = model.get_config("gpt2-124m", vocab_size=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=128, max_seq_len=64)


@pytest.fixture(scope="module")
def params():
    return model.init_params(CONFIG, jax.random.key(5))


def greedy_by_forward(config, params, prompt, n):
    """Greedy continuation by the full forward pass over the sequence so far, padded at the
    end to the model's length (a causal model does not see the padding): one compilation."""
    forward = jax.jit(model.forward, static_argnums=0)
    sequence = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([sequence + [0] * (config.max_seq_len - len(sequence))])
        logits = forward(config, params, padded)
        sequence.append(int(jnp.argmax(logits[0, len(sequence) - 1])))
    return sequence[len(prompt):]


@pytest.mark.parametrize("config", [CONFIG, GPT2, CONFIG.replace(scan_layers=False)], ids=["llama", "gpt2", "unscanned"])
def test_greedy_equals_argmax_of_the_full_forward(config):
    params = model.init_params(config, jax.random.key(5))
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    outputs = generate(config, params, prompts, max_new_tokens=6)
    assert outputs.tokens == [greedy_by_forward(config, params, p, 6) for p in prompts]


def test_a_left_padded_batch_equals_each_prompt_alone(params):
    prompts = [[5], [7, 3, 2, 8, 1, 9, 4], [2, 2, 6]]
    batch = generate(CONFIG, params, prompts, max_new_tokens=9)
    for prompt, tokens, logprobs in zip(prompts, batch.tokens, batch.logprobs):
        alone = generate(CONFIG, params, [prompt], max_new_tokens=9)
        assert tokens == alone.tokens[0]
        np.testing.assert_allclose(logprobs, alone.logprobs[0], atol=1e-5)


def test_rows_stop_after_eos_and_others_continue(params):
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    free = generate(CONFIG, params, prompts, max_new_tokens=8).tokens
    eos = free[0][2]
    stopped = generate(CONFIG, params, prompts, max_new_tokens=8, eos_id=eos).tokens
    assert stopped[0] == free[0][: free[0].index(eos) + 1]
    expected = free[1][: free[1].index(eos) + 1] if eos in free[1] else free[1]
    assert stopped[1] == expected


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
def test_returned_logprobs_equal_training_logprobs(params, temperature):
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    out = generate(CONFIG, params, prompts, max_new_tokens=7, temperature=temperature, rng=jax.random.key(3))
    for prompt, tokens, logprobs in zip(prompts, out.tokens, out.logprobs):
        sequence = jnp.asarray([prompt + tokens])
        hidden = model.hidden_states(CONFIG, params, sequence[:, :-1])
        expected, _ = target_logprobs(CONFIG, params, hidden, sequence[:, 1:], temperature=temperature or 1.0)
        np.testing.assert_allclose(logprobs, expected[0, len(prompt) - 1:], atol=2e-5)


def test_sampling_draws_from_the_tempered_distribution(params):
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.2, 0.0]])) * 1.0
    keys = jax.random.split(jax.random.key(0), 4000)
    draw = jax.vmap(lambda k: next_token(logits, jnp.zeros_like(logits), k, Sampling(temperature=1.0).as_arrays())[0])
    frequencies = np.bincount(np.asarray(draw(keys))[:, 0], minlength=4) / 4000
    np.testing.assert_allclose(frequencies, [0.5, 0.3, 0.2, 0.0], atol=0.03)


@pytest.mark.parametrize(
    "sampling, allowed",
    [
        (Sampling(temperature=1.0, top_k=3), {0, 1, 2}),
        (Sampling(temperature=1.0, top_p=0.75), {0, 1, 2}),  # 0.4 + 0.3 < 0.75
        (Sampling(temperature=1.0, top_p=0.69), {0, 1}),
        (Sampling(temperature=1.0, min_p=0.5), {0, 1}),  # p >= 0.2
        (Sampling(temperature=2.0, top_k=2, top_p=0.99), {0, 1}),
        # The nucleus of the top 2 renormalized (0.57, 0.43), as Hugging Face's warpers chain.
        (Sampling(temperature=1.0, top_k=2, top_p=0.5), {0}),
    ],
)
def test_filters_never_sample_outside_their_set(sampling, allowed):
    probs = np.asarray([0.4, 0.3, 0.15, 0.1, 0.05])
    logits = jnp.log(jnp.asarray(probs))[None].repeat(2, 0)
    keys = jax.random.split(jax.random.key(1), 3000)
    draw = jax.jit(jax.vmap(lambda k: next_token(logits, jnp.zeros_like(logits), k, sampling.as_arrays())[0]))
    seen = set(np.unique(np.asarray(draw(keys))).tolist())
    assert seen == allowed


@pytest.mark.parametrize(
    "sampling",
    [Sampling(temperature=1.0, top_k=1), Sampling(temperature=1.0, top_p=0.0), Sampling(temperature=1.0, min_p=1.0)],
)
def test_the_narrowest_filters_keep_the_most_likely_token(sampling):
    """top_k 1, top_p 0 and min_p 1 each leave only the most likely token (id 2, not id 0)."""
    logits = jnp.log(jnp.asarray([[0.1, 0.2, 0.4, 0.3]]))
    keys = jax.random.split(jax.random.key(1), 500)
    draw = jax.jit(jax.vmap(lambda k: next_token(logits, jnp.zeros_like(logits), k, sampling.as_arrays())[0]))
    assert set(np.unique(np.asarray(draw(keys))).tolist()) == {2}


def test_penalties_discourage_repeats(params):
    prompts = [[5, 9, 11]]
    plain = generate(CONFIG, params, prompts, max_new_tokens=20).tokens[0]
    assert len(set(plain)) < len(plain)
    penalized = generate(CONFIG, params, prompts, max_new_tokens=20, sampling=Sampling(presence_penalty=1e4)).tokens[0]
    assert len(set(penalized)) == len(penalized)
    counts = jnp.zeros((1, 5)).at[0, 0].set(2.0)
    logits = jnp.asarray([[3.0, 2.5, 0.0, 0.0, 0.0]])
    token, _ = next_token(logits, counts, jax.random.key(0), Sampling(frequency_penalty=0.3).as_arrays())
    assert int(token[0]) == 1  # 3.0 - 2 * 0.3 = 2.4 < 2.5


def test_other_shapes_and_settings_reuse_the_compilation(params):
    """Batch 3 and 4, prompt length 3 and 4 and budgets 5 to 8 share one bucket."""
    jax.clear_caches()
    for prompts, new, temperature in [
        ([[1, 2, 3], [4], [5, 6]], 5, 0.0),
        ([[1, 2], [3, 4, 5, 6], [1], [2]], 7, 0.8),
        ([[4, 4, 4, 4], [1], [2, 3]], 8, 1.2),
    ]:
        generate(CONFIG, params, prompts, max_new_tokens=new, temperature=temperature)
    assert gen.sample_padded._cache_size() == 1


def test_beam_search_with_one_beam_is_greedy(params):
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    greedy = generate(CONFIG, params, prompts, max_new_tokens=6, eos_id=7).tokens
    tokens, scores = beam_search(CONFIG, params, prompts, max_new_tokens=6, beams=1, length_penalty=0.0, eos_id=7)
    assert tokens == greedy
    logprobs = generate(CONFIG, params, prompts, max_new_tokens=6, eos_id=7).logprobs
    np.testing.assert_allclose(scores, [sum(row) for row in logprobs], atol=1e-4)


def test_beam_search_of_a_finished_prompt_does_not_depend_on_its_batch(params):
    """Prompt 0 emits EOS after three tokens while prompt 1 runs to the budget. Length penalty 2
    favours long hypotheses, so a beam of prompt 0 carried on past its end would outrank the
    finished one; one beam must still be greedy, and prompt 0 must decode as it does alone."""
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    eos = generate(CONFIG, params, prompts[:1], max_new_tokens=3).tokens[0][-1]
    greedy = generate(CONFIG, params, prompts, max_new_tokens=12, eos_id=eos)
    assert len(greedy.tokens[0]) == 3 and len(greedy.tokens[1]) == 12
    tokens, scores = beam_search(CONFIG, params, prompts, max_new_tokens=12, beams=1, length_penalty=2.0, eos_id=eos)
    assert tokens == greedy.tokens
    np.testing.assert_allclose(scores, [sum(row) / len(row) ** 2 for row in greedy.logprobs], atol=1e-4)
    alone, _ = beam_search(CONFIG, params, prompts[:1], max_new_tokens=12, beams=1, length_penalty=2.0, eos_id=eos)
    assert alone == tokens[:1]


def test_beam_search_finds_the_best_sequence_by_exhaustive_search(params):
    """With as many beams as the vocabulary, two new tokens are searched exhaustively."""
    prompt = [5, 9, 11]
    tokens, scores = beam_search(CONFIG, params, [prompt], max_new_tokens=2, beams=64, length_penalty=0.0)
    first = jax.nn.log_softmax(model.forward(CONFIG, params, jnp.asarray([prompt]))[0, -1])[:64]
    pairs = jnp.asarray([prompt + [a] for a in range(64)])
    second = jax.nn.log_softmax(model.forward(CONFIG, params, pairs)[:, -1], axis=-1)[:, :64]
    total = first[:, None] + second
    best = np.unravel_index(int(jnp.argmax(total)), total.shape)
    assert tokens[0] == list(map(int, best))
    np.testing.assert_allclose(scores[0], float(jnp.max(total)), atol=1e-4)


def test_padded_ids_are_never_generated():
    """Vocabulary 1000, stored as 1024 rows whose padding would win every softmax were it not
    masked: greedy, sampling at a high temperature with filters and penalties, and beams pick
    only real ids, with the log-probs of a float64 log-softmax over the 1000 real ids."""
    config = CONFIG.replace(vocab_size=1000)
    params = model.init_params(config, jax.random.key(5))
    loud = jax.random.normal(jax.random.key(1), (24, config.d_model)) * 10.0  # logits ~ +-80
    params = {**params, "head": params["head"].at[1000:].set(loud)}
    prompts = [[5, 9, 11], [7, 3, 2]]
    for sampling in (
        Sampling(),
        Sampling(temperature=50.0, top_k=1020, top_p=0.9999),
        Sampling(temperature=50.0, min_p=1e-6, presence_penalty=1.0, frequency_penalty=0.5),
    ):
        out = generate(config, params, prompts, max_new_tokens=16, sampling=sampling, rng=jax.random.key(3))
        sequences = np.asarray([p + t for p, t in zip(prompts, out.tokens)])
        assert sequences.shape == (2, 19) and sequences.max() < 1000
        logits = np.asarray(model.forward(config, params, jnp.asarray(sequences[:, :-1])), np.float64)[:, 2:, :1000]
        scaled = logits / (sampling.temperature or 1.0)
        top = scaled.max(-1, keepdims=True)
        logp = scaled - top - np.log(np.exp(scaled - top).sum(-1, keepdims=True))
        new = sequences[:, 3:]
        np.testing.assert_allclose(out.logprobs, np.take_along_axis(logp, new[..., None], -1)[..., 0], atol=2e-5)
        if not sampling.temperature:
            np.testing.assert_array_equal(new, logits.argmax(-1))
    tokens, scores = beam_search(config, params, prompts, max_new_tokens=4, beams=3)
    assert max(max(row) for row in tokens) < 1000 and np.all(np.isfinite(scores))


def test_generation_with_sharded_parameters_equals_unsharded(params):
    from model import sharding

    mesh = sharding.make_mesh((2, 2, 2), model_config=CONFIG)
    sharded = model.init_params(CONFIG, jax.random.key(5), mesh)
    prompts = [[5, 9, 11], [7, 3, 2, 8, 1]]
    out = generate(CONFIG, sharded, prompts, max_new_tokens=5, temperature=0.9, rng=jax.random.key(2))
    ref = generate(CONFIG, params, prompts, max_new_tokens=5, temperature=0.9, rng=jax.random.key(2))
    assert out.tokens == ref.tokens


def test_prompts_longer_than_the_model_are_refused(params):
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=64"):
        generate(CONFIG, params, [[1] * 60], max_new_tokens=5)
    with pytest.raises(ValueError, match="at least one token"):
        generate(CONFIG, params, [[]], max_new_tokens=5)
