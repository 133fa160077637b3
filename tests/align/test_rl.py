"""PPO and GRPO pieces against float64 numpy loops, closed forms and values worked out by hand."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import rl

# Three rows of different lengths; padded positions hold nan, which must not leak anywhere.
LENGTHS = [5, 3, 1]
T = 6
MASK = np.arange(T)[None, :] < np.array(LENGTHS)[:, None]


def _padded(x, fill=np.nan):
    return np.where(MASK, x, fill).astype(np.float32)


def _gae_reference(rewards, values, lengths, gamma, lam):
    """Plain double loop in float64; 0 beyond each row's end."""
    advantages = np.zeros(rewards.shape)
    for b, length in enumerate(lengths):
        following = 0.0
        for t in reversed(range(length)):
            next_value = values[b, t + 1] if t + 1 < length else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            following = delta + gamma * lam * following
            advantages[b, t] = following
    returns = np.where(MASK, advantages + values, 0.0)
    return advantages, returns


@pytest.mark.parametrize("gamma, lam", [(1.0, 0.95), (0.99, 1.0), (0.9, 0.0)])
def test_gae_matches_python_loop_with_padding(gamma, lam):
    rng = np.random.default_rng(0)
    rewards, values = rng.normal(size=(2, len(LENGTHS), T))
    got_adv, got_ret = jax.jit(rl.compute_gae)(_padded(rewards), _padded(values), MASK, gamma, lam)
    want_adv, want_ret = _gae_reference(rewards, values, LENGTHS, gamma, lam)
    np.testing.assert_allclose(got_adv, want_adv, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got_ret, want_ret, rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got_adv)[~MASK] == 0) and np.all(np.asarray(got_ret)[~MASK] == 0)


def test_gae_single_token_and_lambda_one_is_reward_to_go():
    # lam = 1, gamma = 1: A_t = sum of rewards from t - V_t, R_t = reward to go.
    rewards = np.array([[0.0, 0.0, 2.0, 0.0]], np.float32)
    values = np.array([[0.5, 1.0, 1.5, 7.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    adv, ret = rl.compute_gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(ret, [[2.0, 2.0, 2.0, 0.0]])
    np.testing.assert_allclose(adv, [[1.5, 1.0, 0.5, 0.0]])


def test_masked_mean_and_whiten():
    rng = np.random.default_rng(1)
    x = _padded(rng.normal(3.0, 2.0, size=(len(LENGTHS), T)))
    real = x[MASK].astype(np.float64)
    assert float(rl.masked_mean(x, MASK)) == pytest.approx(real.mean(), rel=1e-6)
    np.testing.assert_allclose(
        rl.masked_mean(x, MASK, axis=1), [x[b, :n].astype(np.float64).mean() for b, n in enumerate(LENGTHS)], rtol=1e-6
    )
    assert float(rl.masked_mean(x, np.zeros_like(MASK))) == 0.0  # empty mask: 0, not nan
    assert float(rl.masked_var(x, MASK)) == pytest.approx(real.var(ddof=1), rel=1e-5)
    assert float(rl.masked_var(x, MASK, unbiased=False)) == pytest.approx(real.var(), rel=1e-5)

    white = np.asarray(rl.masked_whiten(x, MASK))
    assert np.all(white[~MASK] == 0)
    assert abs(white[MASK].mean()) < 1e-6 and white[MASK].var(ddof=1) == pytest.approx(1.0, abs=1e-5)
    np.testing.assert_allclose(white[MASK], (real - real.mean()) / real.std(ddof=1), rtol=1e-5, atol=1e-6)
    scaled = np.asarray(rl.masked_whiten(x, MASK, shift_mean=False))
    assert scaled[MASK].mean() == pytest.approx(real.mean(), rel=1e-5)
    assert scaled[MASK].var(ddof=1) == pytest.approx(1.0, abs=1e-5)


def test_kl_estimators_closed_forms():
    logp = np.array([-1.0, -0.2, -3.0, -0.01, -20.0], np.float32)
    ref = np.array([-1.0, -1.7, -0.5, -0.02, -2.0], np.float32)
    r = logp.astype(np.float64) - ref
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k1"), r, rtol=1e-6)
    np.testing.assert_allclose(rl.kl_penalty(logp, ref, "k2"), r**2 / 2, rtol=1e-6)
    k3 = rl.kl_penalty(logp, ref, "k3")
    np.testing.assert_allclose(k3, np.exp(-r) - 1 + r, rtol=1e-5, atol=1e-7)
    # DeepSeekMath's form of the same term: ref/π - log(ref/π) - 1 (float64: in float32 its
    # cancellation near r = 0 loses what expm1 keeps).
    d = ref.astype(np.float64) - logp
    np.testing.assert_allclose(k3, np.exp(d) - d - 1, rtol=1e-5, atol=1e-7)
    assert np.all(np.asarray(k3) >= 0) and float(k3[0]) == 0.0
    with pytest.raises(ValueError, match="k4"):
        rl.kl_penalty(logp, ref, "k4")


def test_kl_estimators_average_to_kl_over_policy_samples():
    p = np.array([0.3, 0.25, 0.2, 0.15, 0.1])
    q = np.array([0.25, 0.25, 0.2, 0.2, 0.1])
    kl = float(np.sum(p * np.log(p / q)))  # ~0.0117
    x = np.random.default_rng(2).choice(len(p), size=200_000, p=p)
    logp, ref = np.log(p[x]).astype(np.float32), np.log(q[x]).astype(np.float32)
    means = {k: float(jnp.mean(rl.kl_penalty(logp, ref, k))) for k in rl.KL_ESTIMATORS}
    assert abs(means["k1"] - kl) < 0.01 and abs(means["k3"] - kl) < 0.01
    assert abs(means["k2"] - kl) < 0.1 * kl  # biased, but close for close distributions
    # k3 has much lower variance than k1 here.
    assert np.var(rl.kl_penalty(logp, ref, "k3")) < 0.1 * np.var(rl.kl_penalty(logp, ref, "k1"))


def test_kl_estimator_expected_gradients_as_documented():
    """Exact expectations over a categorical policy π(θ) = softmax(θ), samples held fixed."""
    theta = jnp.array([0.3, -0.2, 1.0, 0.0])
    ref = jnp.log(jnp.array([0.1, 0.4, 0.3, 0.2]))

    def expected_grad(estimator):
        def loss(theta):
            logp = jax.nn.log_softmax(theta)
            weights = jax.lax.stop_gradient(jnp.exp(logp))  # E over x ~ π, not differentiated
            return jnp.sum(weights * rl.kl_penalty(logp, ref, estimator))
        return jax.grad(loss)(theta)

    reverse_kl = lambda t: jnp.sum(jax.nn.softmax(t) * (jax.nn.log_softmax(t) - ref))
    forward_kl = lambda t: jnp.sum(jnp.exp(ref) * (ref - jax.nn.log_softmax(t)))
    np.testing.assert_allclose(expected_grad("k1"), 0.0, atol=1e-6)
    np.testing.assert_allclose(expected_grad("k2"), jax.grad(reverse_kl)(theta), atol=1e-6)
    np.testing.assert_allclose(expected_grad("k3"), jax.grad(forward_kl)(theta), atol=1e-6)
    # k1 as a reward (PPO): the score-function gradient E[k1 ∇log π] is the reverse KL's.
    logp = jax.nn.log_softmax(theta)
    score_function = jax.grad(lambda t: jnp.sum(jnp.exp(logp) * (logp - ref) * jax.nn.log_softmax(t)))(theta)
    np.testing.assert_allclose(score_function, jax.grad(reverse_kl)(theta), atol=1e-6)


def test_ppo_rewards_place_score_and_penalties():
    rng = np.random.default_rng(3)
    logp, ref = rng.normal(-1.0, 0.5, size=(2, len(LENGTHS), T))
    scores = np.array([1.0, 2.0, 3.0], np.float32)
    eos = np.array([True, False, True])
    fn = jax.jit(functools.partial(rl.ppo_rewards, estimator="k3", missing_eos_penalty=1.5, kl_coef=0.1))
    rewards, kl = fn(scores, _padded(logp), _padded(ref), MASK, ended_with_eos_B=eos)
    r = logp - ref
    want_kl = np.where(MASK, np.exp(-r) - 1 + r, 0.0)
    want = -0.1 * want_kl
    for b, (n, score) in enumerate(zip(LENGTHS, [1.0, 2.0 - 1.5, 3.0])):
        want[b, n - 1] += score
    np.testing.assert_allclose(kl, want_kl, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    # Without the penalty, k1: the score alone at the last token when policy == ref.
    rewards, kl = rl.ppo_rewards(scores, _padded(logp), _padded(logp), MASK, kl_coef=0.1)
    np.testing.assert_allclose(rewards, [[0, 0, 0, 0, 1, 0], [0, 0, 2, 0, 0, 0], [3, 0, 0, 0, 0, 0]])
    with pytest.raises(ValueError, match="ended_with_eos_B"):
        rl.ppo_rewards(scores, logp, ref, MASK, kl_coef=0.1, missing_eos_penalty=1.0)


def test_adaptive_kl_coef():
    # target 6, horizon 10000, 256 rollouts since the last update.
    step = functools.partial(rl.adaptive_kl_coef, 0.2, n_steps=256, target=6.0, horizon=10000)
    assert float(step(9.0)) == pytest.approx(0.2 * (1 + 0.2 * 0.0256))  # error 0.5 -> clipped 0.2
    assert float(step(5.4)) == pytest.approx(0.2 * (1 - 0.1 * 0.0256))  # error -0.1
    assert float(step(0.0)) == pytest.approx(0.2 * (1 - 0.2 * 0.0256))  # error -1 -> clipped -0.2
    assert float(step(6.0)) == pytest.approx(0.2)


def test_ppo_policy_loss_by_hand():
    # eps 0.2; ratios 1.5, 0.7, 0.7; advantages 1, -2, 0.5; a 4th padded token with ratio e^50.
    #   t0: -A ρ = -1.5, -A clip(ρ) = -1.2  -> -1.2  clipped (ρ above 1 + ε, A > 0)
    #   t1: -A ρ =  1.4, -A clip(ρ) =  1.6  ->  1.6  clipped (ρ below 1 - ε, A < 0)
    #   t2: -A ρ = -0.35, -A clip(ρ) = -0.4 -> -0.35 unclipped (the pessimistic bound)
    # loss = (-1.2 + 1.6 - 0.35) / 3 = 0.05 / 3; clipfrac 2/3; only t2 has gradient: -A ρ / 3.
    old = np.array([[-1.0, -2.0, -0.5, 0.0]], np.float32)
    logp = old + np.log([[1.5, 0.7, 0.7, math.exp(50)]]).astype(np.float32)
    advantages = np.array([[1.0, -2.0, 0.5, 7.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]], np.float32)
    fn = jax.jit(jax.value_and_grad(functools.partial(rl.ppo_policy_loss, clip_eps=0.2), has_aux=True))
    (loss, metrics), grad = fn(logp, old, advantages, mask)
    assert float(loss) == pytest.approx(0.05 / 3, abs=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(2 / 3)
    logr = np.log([1.5, 0.7, 0.7])
    assert float(metrics["approxkl"]) == pytest.approx(0.5 * np.mean(logr**2), rel=1e-5)
    assert float(metrics["ratio"]) == pytest.approx(2.9 / 3, rel=1e-6)
    np.testing.assert_allclose(grad, [[0.0, 0.0, -0.5 * 0.7 / 3, 0.0]], atol=1e-7)


def test_ppo_value_loss_by_hand():
    # eps 0.2; old values 1, 1, 1; new 1.5, 0.9, 0.5; returns 2, 0, 1.2; a padded 4th token.
    #   t0: clipped value 1.2: (1.5-2)^2 = 0.25 < (1.2-2)^2 = 0.64  -> 0.64 clipped
    #   t1: inside the range: 0.81 both                              -> 0.81 not clipped
    #   t2: clipped value 0.8: (0.5-1.2)^2 = 0.49 > 0.16             -> 0.49
    # loss = 0.5 (0.64 + 0.81 + 0.49) / 3 = 0.97 / 3; clipfrac 1/3.
    values = np.array([[1.5, 0.9, 0.5, np.inf]], np.float32)
    old = np.array([[1.0, 1.0, 1.0, np.nan]], np.float32)
    returns = np.array([[2.0, 0.0, 1.2, 5.0]], np.float32)
    mask = np.array([[1, 1, 1, 0]])
    fn = jax.value_and_grad(functools.partial(rl.ppo_value_loss, clip_eps_value=0.2), has_aux=True)
    (loss, metrics), grad = fn(values, old, returns, mask)
    assert float(loss) == pytest.approx(0.97 / 3, rel=1e-6)
    assert float(metrics["clipfrac"]) == pytest.approx(1 / 3)
    # t0's max is the clipped term (no gradient through v); t1 and t2: (v - R) / 3.
    np.testing.assert_allclose(grad, [[0.0, 0.9 / 3, -0.7 / 3, 0.0]], atol=1e-6)


def test_first_minibatch_is_the_plain_policy_gradient():
    rng = np.random.default_rng(4)
    logp = _padded(rng.normal(-1.0, 0.5, size=(len(LENGTHS), T)), np.inf)
    advantages = _padded(rng.normal(size=(len(LENGTHS), T)))
    (loss, metrics), grad = jax.value_and_grad(
        functools.partial(rl.ppo_policy_loss, clip_eps=0.2), has_aux=True
    )(logp, logp, advantages, MASK)
    assert float(metrics["ratio"]) == 1.0 and float(metrics["clipfrac"]) == 0.0 and float(metrics["approxkl"]) == 0.0
    real = advantages[MASK].astype(np.float64)
    assert float(loss) == pytest.approx(-real.mean(), rel=1e-5)
    np.testing.assert_allclose(grad, np.where(MASK, -advantages / MASK.sum(), 0.0), rtol=1e-6, atol=1e-8)


def test_entropy_from_logits():
    rng = np.random.default_rng(5)
    logits = rng.normal(0.0, 300.0, size=(2, 3, 7))  # far past where exp overflows
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        want = -np.sum(np.where(p > 0, p * np.log(p), 0.0), axis=-1)
    np.testing.assert_allclose(rl.entropy_from_logits(logits.astype(np.float32)), want, rtol=1e-4, atol=1e-5)
    assert float(rl.entropy_from_logits(np.zeros(16, np.float32))) == pytest.approx(math.log(16), rel=1e-6)
    filtered = jnp.array([0.0, 0.0, -jnp.inf, -jnp.inf])
    assert float(rl.entropy_from_logits(filtered)) == pytest.approx(math.log(2), rel=1e-6)
    assert np.all(np.isfinite(jax.grad(lambda x: rl.entropy_from_logits(x))(filtered)))


def test_grpo_advantages_and_zero_variance():
    rewards = np.array([1, 0, 0, 1, 1, 1, 1, 1, 0.5, 0.5, 0.5, 0.5, 0, 0, 0, 1], np.float32)
    adv = np.asarray(jax.jit(rl.grpo_advantages, static_argnums=1)(rewards, 4))
    std = math.sqrt(1 / 3)  # sample std of [1, 0, 0, 1]: squares 4 · 0.25 over 3
    np.testing.assert_allclose(adv[:4], np.array([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4), rtol=1e-6)
    assert np.all(adv[4:12] == 0)  # equal rewards: 0, not nan
    std_last = math.sqrt((3 * 0.25**2 + 0.75**2) / 3)  # [0, 0, 0, 1]: mean 0.25
    np.testing.assert_allclose(adv[12:], np.array([-0.25, -0.25, -0.25, 0.75]) / (std_last + 1e-4), rtol=1e-6)
    np.testing.assert_allclose(
        rl.grpo_advantages(rewards, 4, scale="none"), [0.5, -0.5, -0.5, 0.5] + [0] * 8 + [-0.25] * 3 + [0.75]
    )
    assert float(rl.zero_variance_fraction(rewards, 4)) == 0.5
    assert float(rl.zero_variance_fraction(rewards, 2)) == 5 / 8  # pairs [1,0], [0,1], [0,1] differ
    with pytest.raises(ValueError, match="groups of 3"):
        rl.grpo_advantages(rewards, 3)


# Two rows, lengths 3 and 1, advantages 1 and -2, padding garbage.
G_MASK = np.array([[1, 1, 1], [1, 0, 0]], bool)
G_ADV = np.array([1.0, -2.0], np.float32)


def _grpo(logp, old, ref, aggregation, kl_coef=0.0, **kwargs):
    fn = functools.partial(rl.grpo_loss, clip_eps=0.2, kl_coef=kl_coef, aggregation=aggregation, **kwargs)
    return jax.value_and_grad(fn, has_aux=True)(logp, old, ref, G_ADV, G_MASK)


def test_grpo_loss_aggregations_by_hand():
    # ρ = 1 and ref = policy: per-token loss -A = [-1, -1, -1] and [2]; kl 0.
    logp = np.array([[-1.0, -0.5, -2.0], [-0.3, np.nan, np.inf]], np.float32)
    expected = {
        "token": (-3 + 2) / 4,  # DAPO: over all 4 tokens
        "sequence": (-1 + 2) / 2,  # mean of row means
        "dr_grpo": (-3 + 2) / (2 * 3),  # B · T
    }
    for aggregation, want in expected.items():
        (loss, metrics), grad = _grpo(logp, logp, logp, aggregation, kl_coef=0.5)
        assert float(loss) == pytest.approx(want, rel=1e-6), aggregation
        assert float(metrics["kl"]) == 0.0 and float(metrics["clipfrac"]) == 0.0
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~G_MASK] == 0)
    (loss, _), _ = _grpo(logp, logp, None, "dr_grpo", max_len=4)
    assert float(loss) == pytest.approx(-1 / 8)
    # Gradients: token spreads 1/4 per token; sequence weights row 1's one token by 1/2.
    np.testing.assert_allclose(_grpo(logp, logp, logp, "token")[1], [[-0.25, -0.25, -0.25], [0.5, 0, 0]])
    np.testing.assert_allclose(_grpo(logp, logp, logp, "sequence")[1], [[-1 / 6, -1 / 6, -1 / 6], [1.0, 0, 0]])


def test_grpo_loss_kl_term_and_clipping_by_hand():
    # ρ = 1; ref - logp = [log 2, 0, -1] and [0.5]: k3 = e^d - d - 1 per token.
    logp = np.array([[-1.0, -0.5, -2.0], [-0.3, 0.0, 0.0]], np.float32)
    d = np.array([[math.log(2), 0.0, -1.0], [0.5, 0.0, 0.0]])
    k3 = np.exp(d) - d - 1
    (loss, metrics), grad = _grpo(logp, logp, (logp + d).astype(np.float32), "token", kl_coef=0.1)
    assert float(metrics["kl"]) == pytest.approx(k3[G_MASK].mean(), rel=1e-5)
    assert float(loss) == pytest.approx((-3 + 2 + 0.1 * k3[G_MASK].sum()) / 4, rel=1e-5)
    # d k3 / d logp = 1 - e^d.
    want_grad = np.where(G_MASK, (-G_ADV[:, None] + 0.1 * (1 - np.exp(d))) / 4, 0.0)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    # Clipping: ρ = 1.3 on row 0 (A = 1) is clipped at 1.2, and not with clip-higher 0.28.
    old = logp - np.log(np.array([[1.3, 1.3, 1.3], [1.0, 1.0, 1.0]], np.float32))
    (loss, metrics), _ = _grpo(logp, old, None, "token")
    assert float(loss) == pytest.approx((-3 * 1.2 + 2) / 4, rel=1e-5)
    assert float(metrics["clipfrac"]) == pytest.approx(3 / 4)
    (loss, metrics), _ = _grpo(logp, old, None, "token", clip_eps_high=0.28)
    assert float(loss) == pytest.approx((-3 * 1.28 + 2) / 4, rel=1e-5)
    (loss, metrics), _ = _grpo(logp, old, None, "token", clip_eps_high=0.4)
    assert float(loss) == pytest.approx((-3 * 1.3 + 2) / 4, rel=1e-5) and float(metrics["clipfrac"]) == 0.0


def test_losses_are_finite_with_garbage_in_padding():
    """nan and inf in padded log-probs, values and advantages reach no value and no gradient."""
    rng = np.random.default_rng(6)
    shape = (len(LENGTHS), T)
    logp = np.where(MASK, rng.normal(-1, 0.3, shape), np.inf).astype(np.float32)
    old = _padded(rng.normal(-1, 0.3, shape), -np.inf)
    adv = _padded(rng.normal(size=shape))
    policy = jax.grad(lambda x: rl.ppo_policy_loss(x, old, adv, MASK, clip_eps=0.2)[0])(logp)
    value = jax.grad(lambda v: rl.ppo_value_loss(v, old, adv, MASK, clip_eps_value=0.2)[0])(logp)
    grpo = jax.grad(
        lambda x: rl.grpo_loss(x, old, _padded(logp), adv[:, 0], MASK, clip_eps=0.2, kl_coef=0.1)[0]
    )(logp)
    for grad in (policy, value, grpo):
        assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad)[~MASK] == 0)
