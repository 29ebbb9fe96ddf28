"""The linear mixture-of-experts continual learner of Li et al. (arXiv 2406.16437).

Data model: ``N`` ground-truth models in ``K`` clusters; round ``t`` draws one,
``w*_{n_t}``, and a feature matrix ``X_t (d, s)``, ``s < d``, one column of which is the task's
signal vector ``v_{n_t}`` and the rest small noise; labels ``y_t = X_t^T w*_{n_t}``.

Model: ``M`` linear experts and gate vectors, all zero at start. Each round:

1. gate ``h_m = theta_m . sum_i X_{t,i}``; noise ``r_m ~ U[0, lambda]``; ``pi = softmax(h + r)``;
   the task goes to ``m_t = argmax(h + r)`` (top-1);
2. expert ``m_t`` moves to the nearest interpolating solution:
   ``w <- w + X (X^T X)^+ (y - X^T w)``; the others do not move;
3. the gate takes one gradient step ``eta`` on ``locality + load balancing``:
   ``sum_m pi_m ||w_t^m - w_{t-1}^m|| + alpha M sum_m f_m P_m``;
4. early termination: from ``t >= M / eta`` expert ``m`` is flagged once
   ``|h_m - h_{m_t}| < Gamma``; flags latch, and when all ``M`` are set the gate is frozen.

Everything is vectorised over a leading axis of independent runs; run ``i`` of seed ``s`` draws
its data from ``numpy.random.default_rng([s, i])`` whatever the number of runs or experts, so
settings compared at the same seed see the same task sequence.

Where the official code (LiHongbo97/MoE-in-CL) differs from the paper we follow the paper:
the gate's flags use the noise-free ``h`` (the code compares ``h + r``); termination may fire
from ``t >= M/eta`` (the code also waits until round ``80 + 3M``); the load-balancing gradient
sums over every expert with ``f_m`` the fraction of tasks it received (the code keeps only the
routed expert's term, with ``f = 1/t``). The code's un-squared metrics are the
``metrics="code"`` option (a measurement choice; see :mod:`moecl.theory.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from moecl.theory.metrics import Metrics, forgetting_and_error, task_error


@dataclass
class LinearMoEConfig:
    """Settings of one simulation; defaults are the paper's forgetting experiment.

    Args:
        d: feature dimension.
        s: samples per task (``s < d``: over-parameterised, so each task is interpolated).
        N: ground-truth models in the pool.
        K: clusters; model ``n`` belongs to cluster ``n mod K``.
        M: experts.
        T: rounds (tasks).
        sigma0: norm of a cluster centre ``w*``; also sets ``Gamma = sigma0 ** gamma_exponent``.
        cluster_spread: std of a model's offset from its cluster centre (code: sigma0 / 200).
        signal_norm: norm of the signal vector ``v_n`` (code: 6), along ``w*_n``.
        noise_norm: norm of each noise column of ``X_t`` (code: 0.1).
        eta: gate learning rate.
        lam: upper bound ``lambda`` of the routing noise ``r ~ U[0, lambda]``.
        alpha: weight of the load-balancing loss.
        gamma_exponent: early-termination threshold ``Gamma = sigma0 ** gamma_exponent``.
        termination: apply early termination of the gate's updates.
        metrics: ``"paper"`` (squared norms) or ``"code"`` (the official code's variant).
    """

    d: int = 10
    s: int = 6
    N: int = 7
    K: int = 3
    M: int = 5
    T: int = 2000
    sigma0: float = 0.4
    cluster_spread: float = 0.002
    signal_norm: float = 6.0
    noise_norm: float = 0.1
    eta: float = 0.5
    lam: float = 0.3
    alpha: float = 0.5
    gamma_exponent: float = 1.25
    termination: bool = True
    metrics: Metrics = "paper"

    def __post_init__(self) -> None:
        if not 0 < self.s < self.d:
            raise ValueError(f"need 0 < s < d (over-parameterised tasks), got s={self.s}, d={self.d}")
        if not 1 <= self.K <= self.N:
            raise ValueError(f"need 1 <= K <= N, got K={self.K}, N={self.N}")
        if self.M < 1 or self.T < 1:
            raise ValueError(f"M and T must be positive, got M={self.M}, T={self.T}")
        if self.metrics not in ("paper", "code"):
            raise ValueError(f"metrics must be 'paper' or 'code', got {self.metrics!r}")

    @property
    def gamma(self) -> float:
        return self.sigma0**self.gamma_exponent

    @property
    def termination_start(self) -> float:
        """First round (1-based) at which flags may be set: ``M / eta``."""
        return self.M / self.eta


@dataclass
class LinearMoEResult:
    """Curves and records of ``runs`` independent simulations.

    Arrays: ``F``, ``G`` ``(runs, T)``; ``routed`` (expert ``m_t``) and ``task`` (model ``n_t``)
    ``(runs, T)``; ``terminated_at`` ``(runs,)``, the 1-based round at which the gate froze,
    0 where it never did; ``theta_norm`` ``(runs, T)``, the gate's norm after each round.
    """

    config: LinearMoEConfig
    F: np.ndarray
    G: np.ndarray
    routed: np.ndarray
    task: np.ndarray
    terminated_at: np.ndarray
    theta_norm: np.ndarray

    def purity(self, from_round: int | None = None) -> np.ndarray:
        """Per run, the share of tasks (from ``from_round``, default the second half) that went to
        an expert's majority cluster: 1 means every expert serves a single cluster."""
        return cluster_purity(self.routed, self.task % self.config.K, self.config.M, self.config.K, from_round)


def cluster_purity(
    routed: np.ndarray, cluster: np.ndarray, M: int, K: int, from_round: int | None = None
) -> np.ndarray:
    """``sum_m max_k count[m, k] / sum count`` per run, for ``routed``/``cluster`` ``(runs, T)``,
    counted from ``from_round`` (default: the second half, after the exploration phase)."""
    start = routed.shape[1] // 2 if from_round is None else from_round
    routed, cluster = routed[:, start:], cluster[:, start:]
    counts = np.zeros((routed.shape[0], M * K), dtype=np.int64)
    np.add.at(counts, (np.arange(routed.shape[0])[:, None], routed * K + cluster), 1)
    counts = counts.reshape(-1, M, K)
    return counts.max(axis=2).sum(axis=1) / np.maximum(counts.sum(axis=(1, 2)), 1)


# -- data ------------------------------------------------------------------------------------


def ground_truths(rng: np.random.Generator, cfg: LinearMoEConfig) -> tuple[np.ndarray, np.ndarray]:
    """Pool ``w* (N, d)`` and signal vectors ``v (N, d)``: cluster centres of norm ``sigma0``,
    members offset by ``cluster_spread``, ``v_n = signal_norm * w*_n / ||w*_n||``."""
    centres = rng.standard_normal((cfg.K, cfg.d))
    centres *= cfg.sigma0 / np.linalg.norm(centres, axis=1, keepdims=True)
    w = centres[np.arange(cfg.N) % cfg.K] + cfg.cluster_spread * rng.standard_normal((cfg.N, cfg.d))
    w[: cfg.K] = centres
    v = cfg.signal_norm * w / np.linalg.norm(w, axis=1, keepdims=True)
    return w, v


def task_stream(rng: np.random.Generator, cfg: LinearMoEConfig, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Model index ``n_t (T,)`` and features ``X_t (T, d, s)`` for every round."""
    n = rng.integers(0, cfg.N, size=cfg.T)
    X = rng.standard_normal((cfg.T, cfg.d, cfg.s))
    X *= cfg.noise_norm / np.linalg.norm(X, axis=1, keepdims=True)
    signal_col = rng.integers(0, cfg.s, size=cfg.T)
    X[np.arange(cfg.T), :, signal_col] = v[n]
    return n, X


# -- one round's steps (each tested on its own) ------------------------------------------------


def min_norm_update(w: np.ndarray, X: np.ndarray, y: np.ndarray) -> np.ndarray:
    """``w + X (X^T X)^+ (y - X^T w)`` for ``w (..., d)``, ``X (..., d, s)``, ``y (..., s)``: the
    solution of ``X^T w' = y`` nearest to ``w``."""
    residual = y - np.einsum("...ds,...d->...s", X, w)
    return w + np.einsum("...ds,...s->...d", np.linalg.pinv(np.swapaxes(X, -1, -2)), residual)


def update_routed_expert(
    w: np.ndarray, routed: np.ndarray, X: np.ndarray, y: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Train expert ``routed[r]`` of each run on its task; the others keep their weights.

    Args:
        w: experts ``(runs, M, d)``; routed: ``(runs,)``; X: ``(runs, d, s)``; y: ``(runs, s)``.

    Returns:
        The new experts and how far each moved, ``||w_t^m - w_{t-1}^m||`` ``(runs, M)``.
    """
    rows = np.arange(w.shape[0])
    w = w.copy()
    old = w[rows, routed]
    w[rows, routed] = min_norm_update(old, X, y)
    moved = np.zeros(w.shape[:2])
    moved[rows, routed] = np.linalg.norm(w[rows, routed] - old, axis=-1)
    return w, moved


def gate_outputs(theta: np.ndarray, X: np.ndarray) -> np.ndarray:
    """``h_m = theta_m . sum_i X_{:, i}`` for ``theta (..., M, d)``, ``X (..., d, s)`` -> ``(..., M)``."""
    return np.einsum("...md,...d->...m", theta, X.sum(axis=-1))


def route(h: np.ndarray, noise: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Top-1 expert ``argmax(h + r)`` and ``pi = softmax(h + r)``, for ``(..., M)`` inputs."""
    a = h + noise
    pi = np.exp(a - a.max(axis=-1, keepdims=True))
    return a.argmax(axis=-1), pi / pi.sum(axis=-1, keepdims=True)


def locality_loss(pi: np.ndarray, moved: np.ndarray) -> np.ndarray:
    """``sum_m pi_m ||w_t^m - w_{t-1}^m||``, ``moved (..., M)`` the norms of each expert's step."""
    return (pi * moved).sum(axis=-1)


def load_balance_loss(f: np.ndarray, P: np.ndarray, alpha: float) -> np.ndarray:
    """``alpha M sum_m f_m P_m``: ``f`` the share of tasks each expert received, ``P`` its mean
    routing probability; smallest when both are uniform."""
    M = f.shape[-1]
    return alpha * M * (f * P).sum(axis=-1)


def gate_gradient(
    pi: np.ndarray, moved: np.ndarray, f: np.ndarray, t: int, alpha: float, xsum: np.ndarray
) -> np.ndarray:
    """Gradient w.r.t. ``theta (..., M, d)`` of ``locality + load balancing`` at round ``t``.

    With ``P_m = (1/t) sum_{tau<=t} pi_m(X_tau)`` only this round's ``pi`` depends on ``theta_t``,
    so the loss is ``sum_m c_m pi_m`` with ``c_m = moved_m + alpha M f_m / t``, and
    ``dL/dh_i = pi_i (c_i - sum_m c_m pi_m)``, ``dh_i/dtheta_i = sum_j X_{:, j}``.
    """
    M = pi.shape[-1]
    c = moved + alpha * M * f / t
    dh = pi * (c - (c * pi).sum(axis=-1, keepdims=True))  # (..., M)
    return dh[..., :, None] * xsum[..., None, :]


def update_flags(flags: np.ndarray, h: np.ndarray, routed: np.ndarray, gamma: float) -> np.ndarray:
    """Latch flag ``m`` where ``m != m_t`` and ``|h_m - h_{m_t}| < Gamma``; never unset one."""
    h_routed = np.take_along_axis(h, routed[..., None], axis=-1)
    close = np.abs(h - h_routed) < gamma
    close[np.arange(h.shape[0]), routed] = False
    return flags | close


# -- the whole simulation ---------------------------------------------------------------------


def simulate(
    cfg: LinearMoEConfig, runs: int = 1, seed: int = 0, progress: Callable[[], None] | None = None
) -> LinearMoEResult:
    """Run ``runs`` independent simulations of ``cfg.T`` rounds, vectorised over runs.

    ``progress`` is called after every round (all runs advance together).
    """
    R, M, T = runs, cfg.M, cfg.T
    w_star, n, X, noise = [], [], [], []
    for i in range(R):
        data_rng = np.random.default_rng([seed, i])
        w_i, v_i = ground_truths(data_rng, cfg)
        n_i, X_i = task_stream(data_rng, cfg, v_i)
        w_star.append(w_i), n.append(n_i), X.append(X_i)
        noise.append(np.random.default_rng([seed, i, 1]).uniform(0.0, cfg.lam, size=(T, M)))
    w_star, n, X, noise = map(np.stack, (w_star, n, X, noise))  # (R,N,d) (R,T) (R,T,d,s) (R,T,M)
    y = np.einsum("rtds,rtd->rts", X, np.take_along_axis(w_star, n[..., None], axis=1))

    rows = np.arange(R)
    w = np.zeros((R, M, cfg.d))
    theta = np.zeros((R, M, cfg.d))
    flags = np.zeros((R, M), dtype=bool)
    frozen = np.zeros(R, dtype=bool)
    terminated_at = np.zeros(R, dtype=np.int64)
    counts = np.zeros((R, M))
    routed = np.zeros((R, T), dtype=np.int64)
    err_at_train = np.zeros((R, T))
    F, G, theta_norm = np.zeros((R, T)), np.zeros((R, T)), np.zeros((R, T))
    for t in range(T):
        round_ = t + 1
        h = gate_outputs(theta, X[:, t])
        m_t, pi = route(h, noise[:, t])
        routed[:, t] = m_t
        counts[rows, m_t] += 1

        w, moved = update_routed_expert(w, m_t, X[:, t], y[:, t])

        if cfg.termination and round_ >= cfg.termination_start:
            flags = update_flags(flags, h, m_t, cfg.gamma)
            newly = ~frozen & flags.all(axis=-1)
            terminated_at[newly] = round_
            frozen |= newly
        grad = gate_gradient(pi, moved, counts / round_, round_, cfg.alpha, X[:, t].sum(axis=-1))
        theta -= cfg.eta * grad * ~frozen[:, None, None]
        theta_norm[:, t] = np.linalg.norm(theta, axis=(1, 2))

        # Error of each past task's expert now, against that task's ground truth.
        dist = np.linalg.norm(w[:, :, None, :] - w_star[:, None, :, :], axis=-1)  # (R, M, N)
        flat = dist.reshape(R, -1)
        current = task_error(np.take_along_axis(flat, routed[:, : t + 1] * cfg.N + n[:, : t + 1], axis=1), cfg.metrics)
        err_at_train[:, t] = current[:, t]
        F[:, t], G[:, t] = forgetting_and_error(current, err_at_train[:, : t + 1], cfg.metrics)
        if progress is not None:
            progress()
    return LinearMoEResult(cfg, F, G, routed, n, terminated_at, theta_norm)
