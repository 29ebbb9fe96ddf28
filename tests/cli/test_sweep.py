"""`moecl sweep` (issue 16, point 2): a study over one option and its figure."""

import json

import pytest

from moecl.cli.main import main
from moecl.study import sweep_study

TINY = [
    "model=tiny-random",
    "benchmark=smoke",
    "tasks=sentiment,parity",
    "train_size=8",
    "test_size=6",
    "epochs=1",
    "batch_size=4",
    "micro_batch_size=4",
    "max_prompt_tokens=64",
    "max_answer_tokens=8",
    "eval_batch_size=8",
]


def test_sweep_runs_one_entry_per_value_and_draws_cost_and_allocation(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    assert main(["sweep", "tau=0,1", *TINY, "--out", str(out)]) == 0
    points = json.loads((out / "sweep.json").read_text())["points"]
    assert [p["tau"] for p in points] == ["0", "1"]
    for p, folder in zip(points, ("tau-0", "tau-1"), strict=True):
        results = json.loads((out / folder / "seed-0" / "results.json").read_text())
        assert p["OP"] == pytest.approx(results["OP"]) and p["trainable_params"] == results["trainable_params"]
        assert p["seconds_per_step"] > 0 and len(p["allocation"]) == 2
    assert (out / "sweep.png").stat().st_size > 10_000


def test_sweep_spec_errors_name_the_problem():
    with pytest.raises(ValueError, match="write OPTION=V1,V2"):
        sweep_study("tau", {}, [0])
    with pytest.raises(ValueError, match="unknown option"):
        sweep_study("taux=1,2", {}, [0])
