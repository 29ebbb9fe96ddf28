import numpy as np
import pytest

from moecl.theory import LinearMoEConfig, simulate
from moecl.theory.linear import (
    cluster_purity,
    gate_gradient,
    load_balance_loss,
    locality_loss,
    route,
    update_flags,
    update_routed_expert,
)
from moecl.theory.metrics import forgetting_and_error


def test_expert_update_interpolates_its_task_and_leaves_others_unchanged():
    rng = np.random.default_rng(0)
    R, M, d, s = 4, 3, 10, 6
    w = rng.standard_normal((R, M, d))
    X, y = rng.standard_normal((R, d, s)), rng.standard_normal((R, s))
    routed = np.array([0, 2, 1, 2])
    new, moved = update_routed_expert(w, routed, X, y)
    for r in range(R):
        np.testing.assert_allclose(X[r].T @ new[r, routed[r]], y[r], atol=1e-12)
        # nearest solution: the step lies in the column space of X
        step = new[r, routed[r]] - w[r, routed[r]]
        coef = np.linalg.lstsq(X[r], step, rcond=None)[0]
        np.testing.assert_allclose(X[r] @ coef, step, atol=1e-12)
        assert moved[r, routed[r]] == pytest.approx(np.linalg.norm(step))
        for m in set(range(M)) - {routed[r]}:
            assert np.array_equal(new[r, m], w[r, m]) and moved[r, m] == 0


def test_routing_picks_argmax_of_gate_plus_noise():
    h = np.array([[0.1, 0.5, 0.2], [1.0, 0.0, 0.95]])
    r = np.array([[0.5, 0.0, 0.1], [0.0, 0.0, 0.1]])
    m, pi = route(h, r)
    assert m.tolist() == [0, 2]  # noise flips both winners
    np.testing.assert_allclose(pi, np.exp(h + r) / np.exp(h + r).sum(-1, keepdims=True))


def test_load_balancing_term_equals_hand_computed_value():
    f = np.array([0.5, 0.25, 0.25])
    P = np.array([0.2, 0.3, 0.5])
    # alpha * M * sum f P = 0.5 * 3 * (0.10 + 0.075 + 0.125)
    assert load_balance_loss(f, P, alpha=0.5) == pytest.approx(0.45)
    assert load_balance_loss(np.full(4, 0.25), np.full(4, 0.25), alpha=1.0) == pytest.approx(1.0)  # 4 * 4/16


def test_gate_gradient_matches_finite_differences_of_the_loss():
    rng = np.random.default_rng(1)
    M, d, s, t, alpha = 4, 5, 3, 7, 0.5
    theta, X = rng.standard_normal((M, d)), rng.standard_normal((d, s))
    noise = rng.uniform(0, 0.3, M)
    moved = np.zeros(M)
    moved[2] = 0.8
    f = np.array([2, 1, 3, 1]) / t
    past_pi_sum = rng.uniform(0, 1, M)  # earlier rounds' pi, constant w.r.t. theta_t

    def loss(th):
        _, pi = route(th @ X.sum(-1), noise)
        return locality_loss(pi, moved) + load_balance_loss(f, (past_pi_sum + pi) / t, alpha)

    _, pi = route(theta @ X.sum(-1), noise)
    grad = gate_gradient(pi, moved, f, t, alpha, X.sum(-1))
    eps, numeric = 1e-6, np.zeros_like(theta)
    for idx in np.ndindex(theta.shape):
        e = np.zeros_like(theta)
        e[idx] = eps
        numeric[idx] = (loss(theta + e) - loss(theta - e)) / (2 * eps)
    np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-9)


def test_termination_flags_latch():
    flags = np.zeros((1, 3), dtype=bool)
    flags = update_flags(flags, np.array([[0.0, 0.1, 5.0]]), np.array([0]), gamma=0.3)
    assert flags.tolist() == [[False, True, False]]  # the routed expert is never flagged by itself
    flags = update_flags(flags, np.array([[0.0, 9.0, 9.0]]), np.array([0]), gamma=0.3)
    assert flags.tolist() == [[False, True, False]]  # far apart now, but the flag stays
    flags = update_flags(flags, np.array([[0.0, 9.0, 0.2]]), np.array([1]), gamma=10.0)
    assert flags.all()


def test_termination_freezes_the_gate():
    # A huge Gamma flags every non-routed expert from round M / eta = 6 on; the gate freezes once
    # each expert has been flagged, i.e. has lost a round to another one.
    cfg = LinearMoEConfig(M=3, T=40, eta=0.5, gamma_exponent=-20.0)
    res = simulate(cfg, runs=3, seed=0)
    assert ((res.terminated_at >= 6) & (res.terminated_at <= 12)).all()
    for run, k in enumerate(res.terminated_at):
        frozen = res.theta_norm[run, k - 1 :]
        assert np.all(frozen == frozen[0])
        assert res.theta_norm[run, k - 2] != res.theta_norm[run, k - 3]  # it moved before
    free = simulate(LinearMoEConfig(M=3, T=40, eta=0.5, termination=False), runs=3, seed=0)
    assert (free.terminated_at == 0).all() and (free.theta_norm[:, -1] != free.theta_norm[:, 10]).all()


def test_one_expert_forgets_more_than_five():
    one = simulate(LinearMoEConfig(M=1, T=300), runs=3, seed=0)
    five = simulate(LinearMoEConfig(M=5, T=300), runs=3, seed=0)
    assert one.F[:, -1].mean() > 2 * five.F[:, -1].mean()
    assert one.G[:, -1].mean() > five.G[:, -1].mean()


def test_simulation_is_deterministic_and_runs_are_independent_of_their_number():
    cfg = LinearMoEConfig(M=4, T=60)
    a, b = simulate(cfg, runs=3, seed=7), simulate(cfg, runs=1, seed=7)
    assert np.array_equal(a.F[:1], b.F) and np.array_equal(a.routed[:1], b.routed)
    assert not np.array_equal(simulate(cfg, runs=1, seed=8).task, b.task)


def test_forgetting_and_error_on_hand_computed_values():
    current = np.array([[0.5, 0.2, 0.1]])
    at_train = np.array([[0.1, 0.4, 0.1]])
    f, g = forgetting_and_error(current, at_train, "paper")
    assert f[0] == pytest.approx(((0.5 - 0.1) + (0.2 - 0.4)) / 2)  # the current task is excluded
    assert g[0] == pytest.approx(0.8 / 3)
    f, _ = forgetting_and_error(current, at_train, "code")
    assert f[0] == pytest.approx((0.4 + 0.2) / 2)


def test_cluster_purity():
    routed = np.array([[0, 0, 1, 1, 1]])
    cluster = np.array([[2, 2, 0, 0, 1]])
    assert cluster_purity(routed, cluster, M=2, K=3, from_round=0)[0] == pytest.approx(4 / 5)
    assert cluster_purity(routed, cluster, M=2, K=3)[0] == pytest.approx(2 / 3)  # default: second half


@pytest.mark.parametrize("bad", [dict(s=10), dict(K=9), dict(metrics="other")])
def test_bad_config_is_refused(bad):
    with pytest.raises(ValueError):
        LinearMoEConfig(**bad)
