"""The neural version of the theory's experiment (arXiv 2406.16437): MLP experts on binary digit tasks.

Task kinds are "is it 1", "is it 4", "is it 7" on scikit-learn's bundled 8x8 digits (offline;
the paper's authors used MNIST). Each round draws a kind and a fresh balanced training sample
of it; the gate reads the kind's mean positive image (unit norm), exactly as the authors' gate
reads a per-task mean image; top-1 noisy routing, the locality + load-balancing gate step and
early termination are those of :mod:`moecl.theory.linear`, with an expert's move
``||w_t - w_{t-1}||`` measured over its flattened parameters.

``F_t`` and ``G_t`` use each past task's test loss (MSE of the sigmoid output, as the official
code measures) of the expert that learned it, now versus right after learning it.

Deviation from the official code, by design: the code re-initialises the chosen expert before
every round and trains it on the new task alone, which makes forgetting total by construction;
here an expert keeps training from where it stopped, as the paper's algorithm says.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from moecl.theory.linear import cluster_purity, gate_gradient, route, update_flags
from moecl.theory.metrics import Metrics, forgetting_and_error, past_task_errors


@dataclass
class DigitsMoEConfig:
    """Settings of the neural experiment (defaults follow the official script where it has one).

    Args:
        digits: the positive digit of each task kind.
        M: experts.
        T: rounds.
        n_train: training examples per round, half of them positives.
        hidden: width of each expert's hidden layer (64 -> hidden -> 1 MLP).
        steps: full-batch SGD steps an expert takes on its round's task.
        lr: SGD learning rate of the experts.
        sigma0: sets the termination threshold ``Gamma = sigma0 ** gamma_exponent``.
        eta, lam, alpha: gate learning rate, routing-noise bound, load-balancing weight.
        gamma_exponent: see ``sigma0``.
        termination: apply early termination of the gate.
        test_fraction: share of the digits held out to measure test loss.
        metrics: ``"paper"`` (signed forgetting) or ``"code"`` (absolute changes).
    """

    digits: tuple[int, ...] = (1, 4, 7)
    M: int = 4
    T: int = 60
    n_train: int = 100
    hidden: int = 32
    steps: int = 100
    lr: float = 0.5
    sigma0: float = 0.05
    eta: float = 0.3
    lam: float = 0.005
    alpha: float = 0.3
    gamma_exponent: float = 1.25
    termination: bool = True
    test_fraction: float = 0.3
    metrics: Metrics = "paper"

    @property
    def gamma(self) -> float:
        return self.sigma0**self.gamma_exponent


@dataclass
class DigitsMoEResult:
    """As :class:`~moecl.theory.linear.LinearMoEResult`, with ``task`` the task kind index."""

    config: DigitsMoEConfig
    F: np.ndarray
    G: np.ndarray
    routed: np.ndarray
    task: np.ndarray
    terminated_at: np.ndarray

    def purity(self, from_round: int | None = None) -> np.ndarray:
        return cluster_purity(self.routed, self.task, self.config.M, len(self.config.digits), from_round)


def load_split(test_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's digits scaled to [0, 1], split once into train and test by a fixed seed."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x, y = data.data.astype(np.float32) / 16.0, data.target
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(test_fraction * len(y)))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


def _experts(M: int, hidden: int, seed: int) -> list[nn.Sequential]:
    """``M`` freshly initialised 64 -> hidden -> 1 MLPs, the same for the same seed."""
    with torch.random.fork_rng():  # leave the caller's global RNG untouched
        torch.manual_seed(seed)
        return [nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 1)) for _ in range(M)]


def _flat(net: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in net.parameters()])


def _mse(net: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((torch.sigmoid(net(x)).squeeze(-1) - y) ** 2).mean()


@dataclass
class _Data:
    """Training pool, test sets and the gate's input of every task kind."""

    x_train: np.ndarray  # (n, 64)
    y_train: np.ndarray  # (n,) digit labels
    x_test: torch.Tensor  # (n_test, 64)
    test_labels: list[torch.Tensor]  # per kind, (n_test,) in {0, 1}
    gate_inputs: np.ndarray  # (kinds, 64), each kind's mean positive image, unit norm

    @classmethod
    def load(cls, cfg: DigitsMoEConfig) -> _Data:
        x_train, y_train, x_test, y_test = load_split(cfg.test_fraction)
        gate_inputs = np.stack([x_train[y_train == c].mean(axis=0) for c in cfg.digits])
        gate_inputs /= np.linalg.norm(gate_inputs, axis=1, keepdims=True)
        labels = [torch.from_numpy((y_test == c).astype(np.float32)) for c in cfg.digits]
        return cls(x_train, y_train, torch.from_numpy(x_test), labels, gate_inputs)


def simulate_digits(
    cfg: DigitsMoEConfig, runs: int = 1, seed: int = 0, progress: Callable[[], None] | None = None
) -> DigitsMoEResult:
    """Run ``runs`` independent neural simulations of ``cfg.T`` rounds each.

    ``progress`` is called after every round of every run.
    """
    data = _Data.load(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 64x32 MLP runs slower when two threads share it
    try:
        records = [_simulate_run(cfg, data, seed, run, progress) for run in range(runs)]
    finally:
        torch.set_num_threads(threads)
    F, G, routed, task, terminated_at = (np.stack(field) for field in zip(*records, strict=True))
    return DigitsMoEResult(cfg, F, G, routed, task, terminated_at)


def _simulate_run(
    cfg: DigitsMoEConfig, data: _Data, seed: int, run: int, progress: Callable[[], None] | None
) -> tuple[np.ndarray, ...]:
    """One run: ``F (T,)``, ``G (T,)``, routed expert and task kind ``(T,)``, termination round.

    Tasks, routing noise and expert initialisation draw from separate streams of ``(seed, run)``,
    so settings with different ``M`` see the same task stream.
    """
    M, T, kinds = cfg.M, cfg.T, len(cfg.digits)
    rng = np.random.default_rng([seed, run])
    noise_rng = np.random.default_rng([seed, run, 1])
    experts = _experts(M, cfg.hidden, int(np.random.default_rng([seed, run, 2]).integers(2**31)))
    theta = np.zeros((1, M, 64))
    flags, frozen, terminated_at = np.zeros((1, M), dtype=bool), False, np.int64(0)
    counts = np.zeros(M)
    routed, task = np.zeros((1, T), dtype=np.int64), np.zeros((1, T), dtype=np.int64)
    F, G, err_at_train = np.zeros(T), np.zeros(T), np.zeros((1, T))
    for t in range(T):
        round_ = t + 1
        k = int(rng.integers(kinds))
        task[0, t] = k
        digit = cfg.digits[k]
        pos = rng.choice(np.flatnonzero(data.y_train == digit), cfg.n_train // 2)
        neg = rng.choice(np.flatnonzero(data.y_train != digit), cfg.n_train - cfg.n_train // 2)
        xb = torch.from_numpy(data.x_train[np.concatenate([pos, neg])])
        yb = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])

        h = theta @ data.gate_inputs[k]  # (1, M)
        m_t, pi = route(h, noise_rng.uniform(0.0, cfg.lam, size=(1, M)))
        m = int(m_t[0])
        routed[0, t] = m
        counts[m] += 1

        net = experts[m]
        before = _flat(net)
        opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
        for _ in range(cfg.steps):
            opt.zero_grad()
            _mse(net, xb, yb).backward()
            opt.step()
        moved = np.zeros((1, M))
        moved[0, m] = float(torch.linalg.vector_norm(_flat(net) - before))

        if cfg.termination and round_ >= M / cfg.eta:
            flags = update_flags(flags, h, m_t, cfg.gamma)
            if not frozen and flags.all():
                frozen, terminated_at = True, np.int64(round_)
        if not frozen:
            grad = gate_gradient(pi, moved, counts[None] / round_, round_, cfg.alpha, data.gate_inputs[k][None])
            theta -= cfg.eta * grad

        with torch.no_grad():
            losses = np.array([[[float(_mse(e, data.x_test, lab)) for lab in data.test_labels] for e in experts]])
        current = past_task_errors(losses, routed[:, : t + 1], task[:, : t + 1])
        err_at_train[0, t] = current[0, t]
        f, g = forgetting_and_error(current, err_at_train[:, : t + 1], cfg.metrics)
        F[t], G[t] = f[0], g[0]
        if progress is not None:
            progress()
    return F, G, routed[0], task[0], terminated_at
