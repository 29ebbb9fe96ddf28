import json

import numpy as np
import pytest

from moecl.cli.main import main
from moecl.theory.experiments import settings_for
from moecl.theory.neural import DigitsMoEConfig, simulate_digits


def test_settings_are_keyed_as_documented():
    keys = [s.key for s in settings_for("forgetting")]
    assert keys[:4] == ["M=1", "M=5", "M=10", "M=20"] and "M=5,no-termination" in keys
    assert [s.key for s in settings_for("forgetting", termination=False)][1] == "M=5,no-termination"
    threshold = settings_for("threshold")
    assert threshold[2].key == "Gamma=0.4^1.25" and threshold[2].config.gamma == pytest.approx(0.4**1.25)
    assert {s.config.N for s in threshold} == {30} and {s.config.T for s in threshold} == {500}
    with pytest.raises(ValueError, match="drop --no-termination"):
        settings_for("threshold", termination=False)


def test_cli_forgetting_writes_every_output(tmp_path, capsys):
    out = tmp_path / "forgetting"
    assert main(["theory", "forgetting", "--out", str(out), "--seeds", "2", "--rounds", "40"]) == 0
    names = {p.name for p in out.iterdir()}
    assert {
        "summary.md",
        "summary.json",
        "curves.json",
        "config.json",
        "F_t.png",
        "G_t.png",
        "F_t_no-termination.png",
        "G_t_no-termination.png",
    } <= names
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {f"M={m}{s}" for m in (1, 5, 10, 20) for s in ("", ",no-termination")}
    assert {"F_T_mean", "F_T_sd", "G_T_mean", "G_T_sd"} <= set(summary["M=5"])
    curves = json.loads((out / "curves.json").read_text())
    assert len(curves["M=5"]["G"]["mean"]) == 40
    assert "| M=5 |" in (out / "summary.md").read_text() and "| M=5 |" in capsys.readouterr().out
    assert (out / "F_t.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_arguments_without_a_traceback(tmp_path, capsys):
    assert main(["theory", "threshold", "--out", str(tmp_path), "--no-termination"]) == 2
    assert "drop --no-termination" in capsys.readouterr().out


def test_digits_is_deterministic_and_one_expert_forgets_more():
    cfg = DigitsMoEConfig(M=1, T=12, steps=30)
    a, b = simulate_digits(cfg, runs=2, seed=3), simulate_digits(cfg, runs=2, seed=3)
    assert np.array_equal(a.F, b.F) and np.array_equal(a.task, b.task)
    assert a.F.shape == (2, 12) and (a.routed == 0).all()
    moe = simulate_digits(DigitsMoEConfig(M=4, T=12, steps=30), runs=2, seed=3)
    assert np.array_equal(moe.task, a.task)  # same task stream for every M at one seed
    assert moe.F[:, -1].mean() < a.F[:, -1].mean()
