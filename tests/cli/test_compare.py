"""`moecl run --seeds` and `moecl compare`: per-seed folders, mean ± 95% CI, floors, Table-1 layout, the figure."""

import csv
import json
import statistics

import pytest

from moecl.cli.main import main

TINY = [
    "--preset",
    "smoke",
    "tasks=sentiment,parity",
    "train_size=8",
    "test_size=6",
    "epochs=1",
    "batch_size=4",
    "micro_batch_size=4",
]


def test_seeds_then_compare_write_mean_ci_and_floors_in_table_one_layout(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    pmoe, lora = tmp_path / "pmoe", tmp_path / "lora"
    assert main(["run", *TINY, "--seeds", "0,1", "--out", str(pmoe)]) == 0
    assert main(["run", *TINY, "--method", "seq-lora", "--out", str(lora)]) == 0
    per_seed = [json.loads((pmoe / f"seed-{s}" / "results.json").read_text()) for s in (0, 1)]
    assert [r["seed"] for r in per_seed] == [0, 1]
    summary = json.loads((pmoe / "seeds.json").read_text())
    ops = [r["OP"] for r in per_seed]
    assert summary["OP"]["mean"] == pytest.approx(statistics.mean(ops))
    assert summary["OP"]["sd"] == pytest.approx(statistics.stdev(ops))

    out = tmp_path / "cmp"
    assert main(["compare", str(pmoe), str(lora), "--labels", "PMoE,LoRA", "--out", str(out)]) == 0
    lines = (out / "compare.md").read_text().splitlines()
    assert lines[0] == "| task | majority | zero-shot | PMoE | LoRA |"
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:13]] == [
        "sentiment",
        "parity",
        "OP",
        "BWT",
        "trainable %",
        "wall minutes",
        "diagonal mass",
        "own expert after own task",
        "own expert at end: sentiment",
        "own expert at end: parity",
        "seeds",
    ]
    op_row = next(line for line in lines if line.startswith("| OP |"))
    mean, half = statistics.mean(ops), 12.7062047 * statistics.stdev(ops) / 2**0.5  # t_{0.975, 1} * sem
    assert f"{mean:.2f} ± {half:.2f}" in op_row
    rows = {r[0]: r for r in csv.reader((out / "compare.csv").read_text().splitlines())}
    assert float(rows["OP"][3]) == pytest.approx(mean, abs=1e-4) and rows["OP"][5] == "2"
    lora_results = json.loads((lora / "results.json").read_text())
    assert float(rows["OP"][6]) == pytest.approx(lora_results["OP"], abs=1e-4)
    assert (out / "r_matrices.png").stat().st_size > 1000
    diagonal = [r["diagonal_mass_phases"][-1] for r in per_seed]
    # The first task counts too (its gate is 1 while its expert is the only one).
    own = [(r["router_allocation_phases"][0][0][0] + r["router_allocation_phases"][1][1][1]) / 2 for r in per_seed]
    first_at_end = [r["router_allocation_phases"][-1][0][0] for r in per_seed]
    assert all(r["own_expert_gate"]["at_end"][0] == v for r, v in zip(per_seed, first_at_end, strict=True))
    assert float(rows["diagonal mass"][3]) == pytest.approx(statistics.mean(diagonal), abs=1e-4)
    assert float(rows["own expert after own task"][3]) == pytest.approx(statistics.mean(own), abs=1e-4)
    assert float(rows["own expert at end: sentiment"][3]) == pytest.approx(statistics.mean(first_at_end), abs=1e-4)
    assert rows["diagonal mass"][6] == "" and rows["diagonal mass"][8] == "0"  # LoRA: no router


def test_compare_refuses_runs_of_different_streams_and_non_run_folders(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["run", *TINY, "--out", str(a)]) == 0
    assert main(["run", *TINY, "tasks=parity", "--out", str(b)]) == 0
    assert main(["compare", str(a), str(b), "--out", str(tmp_path / "c")]) == 2
    assert main(["compare", str(a), str(tmp_path), "--out", str(tmp_path / "c")]) == 2
    with pytest.raises(SystemExit):
        main(["run", *TINY, "--seeds", "0,x"])
