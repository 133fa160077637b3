"""Preference losses against float64 numpy formulas written out by hand, and their gradients."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from align import losses

# Rows of (policy chosen, policy rejected, ref chosen, ref rejected) log-probs, exact in float32.
# h = (pc - pr) - (rc - rr): 3.25, -4.5, 0, 0.375, and 2000 (beta h far past where a naive
# log(sigmoid) underflows).
LOGPS = np.array(
    [
        [-10.5, -14.25, -11.0, -11.5],
        [-20.0, -18.5, -17.0, -20.0],
        [-5.0, -6.0, -7.0, -8.0],
        [-30.125, -31.0, -29.5, -30.0],
        [-1.0, -2001.0, -1.0, -1.0],
    ]
)
BETA = 0.5


def _log_sigmoid(x):
    return -np.logaddexp(0.0, -x)


def _sigmoid(x):
    return np.exp(_log_sigmoid(x))


def _expected_dpo(loss_type, beta, eps):
    pc, pr, rc, rr = LOGPS.T
    h = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        return -(1 - eps) * _log_sigmoid(beta * h) - eps * _log_sigmoid(-beta * h)
    if loss_type == "robust":
        return (-(1 - eps) * _log_sigmoid(beta * h) + eps * _log_sigmoid(-beta * h)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return np.maximum(0.0, 1 - beta * h)
    return (h - 1 / (2 * beta)) ** 2


def _dpo(loss_type, eps, beta=BETA, logps=LOGPS):
    return losses.dpo_loss(*jnp.asarray(logps.T, jnp.float32), beta=beta, loss_type=loss_type, label_smoothing=eps)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("loss_type", losses.DPO_LOSS_TYPES)
def test_dpo_losses_match_hand_computation(loss_type, eps):
    got, chosen, rejected = _dpo(loss_type, eps)
    assert got.dtype == jnp.float32 and got.shape == (len(LOGPS),)
    np.testing.assert_allclose(got, _expected_dpo(loss_type, BETA, eps), rtol=1e-6, atol=1e-6)
    pc, pr, rc, rr = LOGPS.T
    np.testing.assert_allclose(chosen, BETA * (pc - rc), rtol=1e-6)
    np.testing.assert_allclose(rejected, BETA * (pr - rr), rtol=1e-6)


def test_dpo_at_the_reference_policy():
    same = np.concatenate([LOGPS[:, :2], LOGPS[:, :2]], axis=1)  # rc = pc, rr = pr
    beta = 0.25
    sigmoid, chosen, rejected = _dpo("sigmoid", 0.0, beta, same)
    np.testing.assert_allclose(sigmoid, np.full(len(same), math.log(2.0)), rtol=1e-6)
    np.testing.assert_array_equal(chosen, 0.0)
    np.testing.assert_array_equal(rejected, 0.0)
    np.testing.assert_array_equal(chosen - rejected, 0.0)
    np.testing.assert_allclose(_dpo("hinge", 0.0, beta, same)[0], 1.0)
    np.testing.assert_allclose(_dpo("ipo", 0.0, beta, same)[0], 1 / (4 * beta**2), rtol=1e-6)


def test_robust_without_smoothing_is_sigmoid():
    np.testing.assert_array_equal(_dpo("robust", 0.0)[0], _dpo("sigmoid", 0.0)[0])


@pytest.mark.parametrize("eps", [0.0, 0.2])
def test_sigmoid_gradient_matches_closed_form(eps):
    pc, pr, rc, rr = jnp.asarray(LOGPS.T, jnp.float32)
    grad_pc = jax.grad(
        lambda pc: jnp.sum(losses.dpo_loss(pc, pr, rc, rr, beta=BETA, label_smoothing=eps)[0])
    )(pc)
    h = (LOGPS[:, 0] - LOGPS[:, 1]) - (LOGPS[:, 2] - LOGPS[:, 3])
    expected = -BETA * (1 - eps) * _sigmoid(-BETA * h) + eps * BETA * _sigmoid(BETA * h)
    np.testing.assert_allclose(grad_pc, expected, rtol=1e-6, atol=1e-7)


def test_rewards_carry_no_gradient():
    pc, pr, rc, rr = jnp.asarray(LOGPS.T, jnp.float32)
    grads = jax.grad(
        lambda pc, pr: jnp.sum(sum(losses.dpo_loss(pc, pr, rc, rr, beta=BETA, loss_type="hinge")[1:])),
        argnums=(0, 1),
    )(pc, pr)
    for g in grads:
        np.testing.assert_array_equal(g, 0.0)


def test_dpo_rejects_bad_arguments():
    with pytest.raises(ValueError, match="sigmoid.*robust.*hinge.*ipo"):
        _dpo("simpo", 0.0)
    for eps in (-0.1, 0.5, 0.7):
        with pytest.raises(ValueError, match="label_smoothing"):
            _dpo("robust", eps)


# KTO: four examples, desirable and undesirable, with mismatched-pair KL estimates.
KTO_POLICY = np.array([-10.0, -12.5, -8.25, -20.0])
KTO_REF = np.array([-11.0, -12.0, -9.0, -19.0])
KTO_LABELS = np.array([1.0, 0.0, 1.0, 0.0])


def _expected_kto(policy_kl, ref_kl, beta, w_d, w_u):
    z0 = max(0.0, float(np.mean(policy_kl - ref_kl)))
    r = KTO_POLICY - KTO_REF
    desirable = w_d * (1 - _sigmoid(beta * (r - z0)))
    undesirable = w_u * (1 - _sigmoid(beta * (z0 - r)))
    return np.where(KTO_LABELS == 1.0, desirable, undesirable), beta * r, z0


@pytest.mark.parametrize(
    "policy_kl, ref_kl",
    [
        (np.array([-30.0, -28.0, -31.0, -27.0]), np.array([-31.0, -29.5, -31.25, -28.0])),  # z0 = 0.9375
        (np.array([-30.0, -28.0, -31.0, -27.0]), np.array([-29.0, -27.5, -30.0, -27.0])),  # mean -0.625 -> 0
    ],
)
def test_kto_matches_hand_computation(policy_kl, ref_kl):
    beta, w_d, w_u = 0.1, 1.0, 1.5
    args = [jnp.asarray(a, jnp.float32) for a in (KTO_POLICY, KTO_REF, policy_kl, ref_kl, KTO_LABELS)]
    got, rewards, kl = losses.kto_loss(*args, beta=beta, desirable_weight=w_d, undesirable_weight=w_u)
    expected, expected_rewards, expected_kl = _expected_kto(policy_kl, ref_kl, beta, w_d, w_u)
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(rewards, expected_rewards, rtol=1e-6)
    np.testing.assert_allclose(kl, expected_kl, rtol=1e-6)


def test_kto_gradient_skips_the_reference_point():
    beta, w_d, w_u = 0.1, 1.0, 1.5
    policy_kl = jnp.array([-30.0, -28.0, -31.0, -27.0])
    ref_kl = jnp.array([-31.0, -29.5, -31.25, -28.0])
    labels = jnp.asarray(KTO_LABELS, jnp.float32)

    def total(policy, policy_kl):
        out = losses.kto_loss(
            policy, jnp.asarray(KTO_REF, jnp.float32), policy_kl, ref_kl, labels,
            beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
        )
        return jnp.sum(out[0]) + jnp.sum(out[1]) + out[2]

    grad_policy, grad_kl = jax.grad(total, argnums=(0, 1))(jnp.asarray(KTO_POLICY, jnp.float32), policy_kl)
    np.testing.assert_array_equal(grad_kl, 0.0)
    # d/dr of w (1 - σ(±β (r - z0))) is ∓ w β σ (1 - σ); rewards add nothing.
    z0 = 0.9375
    r = KTO_POLICY - KTO_REF
    s_d, s_u = _sigmoid(beta * (r - z0)), _sigmoid(beta * (z0 - r))
    expected = np.where(KTO_LABELS == 1.0, -w_d * beta * s_d * (1 - s_d), w_u * beta * s_u * (1 - s_u))
    np.testing.assert_allclose(grad_policy, expected, rtol=1e-5)


@pytest.mark.parametrize("margin", [None, 0.5, np.array([0.0, 1.0, 2.5])])
@pytest.mark.parametrize("center_coeff", [0.0, 0.01])
def test_bradley_terry(margin, center_coeff):
    r_c = np.array([1.5, -0.25, 3.0])
    r_r = np.array([0.5, 0.75, -1.0])
    m = 0.0 if margin is None else margin
    expected = -_log_sigmoid(r_c - r_r - m) + center_coeff * (r_c + r_r) ** 2
    got = losses.bradley_terry_loss(
        jnp.asarray(r_c, jnp.float32), jnp.asarray(r_r, jnp.float32), margin=margin, center_coeff=center_coeff
    )
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_sequence_logps():
    rng = np.random.default_rng(0)
    logps_BT = -rng.exponential(2.0, size=(3, 5))
    mask_BT = np.array([[1, 1, 1, 0, 0], [0, 1, 0, 1, 1], [0, 0, 0, 0, 0]])
    logps_BT[0, 4] = -np.inf  # a masked-out position may hold anything
    masked = np.where(mask_BT == 1, logps_BT, 0.0)
    expected_sum = masked.sum(axis=1)
    expected_mean = np.array([expected_sum[0] / 3, expected_sum[1] / 3, 0.0])
    args = jnp.asarray(logps_BT, jnp.float32), jnp.asarray(mask_BT, jnp.int32)
    np.testing.assert_allclose(losses.sequence_logps(*args), expected_sum, rtol=1e-6)
    np.testing.assert_allclose(losses.sequence_logps(*args, average=True), expected_mean, rtol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(losses.sequence_logps(x, args[1], average=True)))(args[0])
    np.testing.assert_allclose(grad, mask_BT / np.maximum(mask_BT.sum(axis=1, keepdims=True), 1), rtol=1e-6)


def test_kto_rows_marked_invalid_leave_the_reference_point_alone():
    rng = np.random.default_rng(5)
    p, r, pk, rk = (rng.normal(-10, 2, size=6).astype(np.float32) for _ in range(4))
    labels = np.asarray([1, 0, 1, 0, 0, 0], np.float32)
    valid = np.asarray([1, 1, 1, 1, 0, 0], np.float32)
    kwargs = dict(beta=0.3)
    full = losses.kto_loss(p, r, pk, rk, labels, valid=valid, **kwargs)
    subset = losses.kto_loss(p[:4], r[:4], pk[:4], rk[:4], labels[:4], **kwargs)
    np.testing.assert_allclose(float(full[2]), float(subset[2]), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(full[0])[:4], np.asarray(subset[0]), rtol=1e-6)
