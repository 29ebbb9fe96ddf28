"""The theory's experiments (arXiv 2406.16437): which settings each runs, and what each writes.

Every experiment writes into its output directory:

- ``summary.md`` and ``summary.json``: per setting, final ``F_T`` and ``G_T`` (mean and sd over
  runs), ``G`` at ``T/10`` (how fast the error falls), expert-to-cluster purity over the second
  half of the rounds, and the round at which early termination froze the gate;
- ``curves.json``: mean and sd of ``F_t`` and ``G_t`` per round and setting;
- PNG figures of those curves (mean with a one-sd band), one per metric and termination mode;
- ``config.json``: every setting's full configuration, the runs and the seed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from moecl.io import atomic_path, atomic_write_json, atomic_write_text
from moecl.reports.plots import plot_bands
from moecl.reports.tables import markdown_table, mean_sd
from moecl.theory.linear import LinearMoEConfig, LinearMoEResult, simulate
from moecl.theory.metrics import Metrics
from moecl.theory.neural import DigitsMoEConfig, DigitsMoEResult, simulate_digits

Result = LinearMoEResult | DigitsMoEResult
Config = LinearMoEConfig | DigitsMoEConfig

DEFAULT_RUNS = {"forgetting": 5, "threshold": 100, "digits": 5}
DESCRIPTIONS = {
    "forgetting": "Linear MoE, forgetting and generalisation error for M in {1, 5, 10, 20} "
    "(N=7, K=3, d=10, s=6, sigma0=0.4, eta=0.5, lambda=0.3, alpha=0.5).",
    "threshold": "Linear MoE, early-termination threshold Gamma = sigma0^{0.75, 1, 1.25, 1.5} "
    "(N=30, K=3, M=5, T=500), with a no-termination reference.",
    "digits": "MLP experts on scikit-learn digits, binary tasks 'is it 1 / 4 / 7', M in {1, 4, 7}.",
}


@dataclass
class Setting:
    key: str
    config: Config


def settings_for(
    experiment: str, termination: bool = True, metrics: Metrics = "paper", T: int | None = None
) -> list[Setting]:
    """The settings an experiment compares; ``termination=False`` keeps only the runs without it."""
    modes = [True, False] if termination else [False]
    if experiment == "forgetting":
        base: Config = LinearMoEConfig(metrics=metrics)
        grid = [(f"M={m}", {"M": m}) for m in (1, 5, 10, 20)]
    elif experiment == "digits":
        base = DigitsMoEConfig(metrics=metrics)
        grid = [(f"M={m}", {"M": m}) for m in (1, 4, 7)]
    elif experiment == "threshold":
        if not termination:
            raise ValueError("the threshold experiment sweeps the termination threshold; drop --no-termination")
        base = LinearMoEConfig(N=30, M=5, T=500, metrics=metrics)
        settings = [Setting(f"Gamma=0.4^{e:g}", replace(base, gamma_exponent=e)) for e in (0.75, 1.0, 1.25, 1.5)]
        settings.append(Setting("M=5,no-termination", replace(base, termination=False)))
        return [Setting(s.key, replace(s.config, T=T or s.config.T)) for s in settings]
    else:
        raise ValueError(f"unknown experiment {experiment!r}; choose one of {', '.join(DEFAULT_RUNS)}")
    if T is not None:
        base = replace(base, T=T)
    return [
        Setting(key if mode else f"{key},no-termination", replace(base, termination=mode, **change))
        for mode in modes
        for key, change in grid
    ]


def run_setting(setting: Setting, runs: int, seed: int, progress: Callable[[], None] | None = None) -> Result:
    if isinstance(setting.config, LinearMoEConfig):
        return simulate(setting.config, runs=runs, seed=seed, progress=progress)
    return simulate_digits(setting.config, runs=runs, seed=seed, progress=progress)


def summarise(result: Result) -> dict[str, Any]:
    """The numbers of one setting that go to ``summary.json``."""
    T = result.config.T
    fired = result.terminated_at[result.terminated_at > 0]
    purity = result.purity()
    return {
        "F_T_mean": float(result.F[:, -1].mean()),
        "F_T_sd": float(result.F[:, -1].std(ddof=1)) if len(result.F) > 1 else 0.0,
        "G_T_mean": float(result.G[:, -1].mean()),
        "G_T_sd": float(result.G[:, -1].std(ddof=1)) if len(result.G) > 1 else 0.0,
        "G_T10_mean": float(result.G[:, max(T // 10 - 1, 0)].mean()),
        "purity_mean": float(purity.mean()),
        "purity_sd": float(purity.std(ddof=1)) if len(purity) > 1 else 0.0,
        "runs": int(len(result.F)),
        "terminated_runs": int(len(fired)),
        "termination_round_median": float(np.median(fired)) if len(fired) else None,
    }


def _termination_cell(s: dict[str, Any], config: Config) -> str:
    if not config.termination:
        return "off"
    if config.M == 1:
        return "n/a (one expert)"
    if not s["terminated_runs"]:
        return "never"
    return f"{s['termination_round_median']:.0f} (in {s['terminated_runs']}/{s['runs']} runs)"


def write_report(experiment: str, results: dict[str, Result], out: Path, runs: int, seed: int) -> str:
    """Write every output file of an experiment; return the Markdown summary."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {key: summarise(r) for key, r in results.items()}
    any_cfg = next(iter(results.values())).config
    header = ["setting", "F_T", "G_T", "G at T/10", "purity", "termination round (median)"]
    rows = [
        [
            key,
            mean_sd(r.F[:, -1]),
            mean_sd(r.G[:, -1]),
            f"{summary[key]['G_T10_mean']:.4f}",
            mean_sd(r.purity(), 3),
            _termination_cell(summary[key], r.config),
        ]
        for key, r in results.items()
    ]
    text = (
        f"# Theory experiment: {experiment}\n\n{DESCRIPTIONS[experiment]}\n\n"
        f"{runs} runs from seed {seed}, T = {any_cfg.T}, metrics = {any_cfg.metrics!r} "
        "(F_T, G_T, purity: mean ± sd over runs; purity over the second half of the rounds).\n\n"
        + markdown_table(header, rows)
    )
    atomic_write_text(out / "summary.md", text)
    atomic_write_json(out / "summary.json", summary)
    curves = {
        key: {
            name: {
                "mean": np.round(v.mean(0), 6).tolist(),
                "sd": np.round(v.std(0, ddof=1) if len(v) > 1 else 0 * v[0], 6).tolist(),
            }
            for name, v in (("F", r.F), ("G", r.G))
        }
        for key, r in results.items()
    }
    atomic_write_json(out / "curves.json", curves)
    atomic_write_json(
        out / "config.json",
        {
            "experiment": experiment,
            "runs": runs,
            "seed": seed,
            "settings": {k: asdict(r.config) for k, r in results.items()},
        },
    )
    for suffix, keep in (
        ("", lambda k: "no-termination" not in k or experiment == "threshold"),
        ("_no-termination", lambda k: "no-termination" in k and experiment != "threshold"),
    ):
        chosen = {k: r for k, r in results.items() if keep(k)}
        if not chosen:
            continue
        mode = " (no termination)" if suffix else ""
        for name, label in (("F", "forgetting $F_t$"), ("G", "generalisation error $G_t$")):
            with atomic_path(out / f"{name}_t{suffix}.png") as tmp:
                plot_bands(
                    {k: getattr(r, name) for k, r in chosen.items()},
                    label,
                    f"{experiment}{mode}: {label}, {runs} runs",
                    tmp,
                )
    return text
