"""Confidence intervals over seeds and the paired bootstrap, against numbers computed by hand,
on run folders written here by hand (results.json + per-item predictions)."""

import csv
import json
import math

import numpy as np
import pytest

from moecl.reports.compare import write_comparison
from moecl.reports.stats import ItemScores, mean_ci, paired_bootstrap

TASKS = ["t0", "t1"]


def _run_folder(path, seed, final, diag, majority=(50.0, 25.0), zero_shot=(10.0, 0.0)):
    """A finished 2-task run: ``final[i]`` / ``diag[i]`` are task i's per-item 0/100 scores at the end
    and right after its training; R, OP and BWT follow from them as a run would write them."""
    R = [[float(np.mean(diag[0])), None], [float(np.mean(final[0])), float(np.mean(final[1]))]]
    assert final[1] == diag[1]  # the last task's scores right after it are the final ones
    results = {
        "method": "seq-lora",
        "tasks": TASKS,
        "R": R,
        "phases": [[0], [1]],
        "OP": (R[1][0] + R[1][1]) / 2,
        "BWT": (R[1][0] - R[0][0]) / 2,  # seed convention: (1/T) sum_i R[T-1][i] - R[i][i]
        "bwt_convention": "seed",
        "seed": seed,
        "trainable_params": 10,
        "total_params": 1000,
        "wall_seconds": 60.0 * (seed + 1),
        "floors": {t: {"majority": majority[i], "zero_shot": zero_shot[i]} for i, t in enumerate(TASKS)},
    }
    path.mkdir(parents=True)
    (path / "results.json").write_text(json.dumps(results))
    for label, per_task in (("after-task-0", {0: diag[0]}), ("after-task-1", dict(enumerate(final)))):
        for i, scores in per_task.items():
            lines = [
                json.dumps({"prompt": f"{TASKS[i]} q{j}", "answer": "A", "prediction": "A", "score": s})
                for j, s in enumerate(scores)
            ]
            (path / "predictions" / label).mkdir(parents=True, exist_ok=True)
            (path / "predictions" / label / f"{TASKS[i]}.jsonl").write_text("\n".join(lines) + "\n")
    return results


def test_mean_ci_is_students_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0, 4.0])
    sd = math.sqrt(((1.5**2) * 2 + (0.5**2) * 2) / 3)
    assert mean == 2.5 and half == pytest.approx(3.182446305 * sd / 2)  # t_{0.975, 3} * sd / sqrt(4)
    assert mean_ci([7.0]) == (7.0, None)


def test_constant_paired_difference_has_a_degenerate_interval():
    a = {s: ItemScores([["x", "y", "z"]], [np.array([100.0, 0.0, 100.0])], None) for s in (0, 1)}
    b = {s: ItemScores([["x", "y", "z"]], [np.array([90.0, -10.0, 90.0])], None) for s in (0, 1)}
    d = paired_bootstrap(a, b, samples=500)
    assert d["OP"]["diff"] == pytest.approx(10.0)
    assert d["OP"]["low"] == pytest.approx(10.0) and d["OP"]["high"] == pytest.approx(10.0)
    assert d["OP"]["excludes_zero"] and d["BWT"] is None


def test_bootstrap_spread_matches_the_analytic_standard_error():
    """One seed, one task: the bootstrap mean of n paired differences has sd sqrt(var_pop(d) / n)."""
    rng = np.random.default_rng(3)
    a_scores = rng.integers(0, 2, 400) * 100.0
    b_scores = rng.integers(0, 2, 400) * 100.0
    prompts = [[f"q{i}" for i in range(400)]]
    d = paired_bootstrap({0: ItemScores(prompts, [a_scores], None)}, {0: ItemScores(prompts, [b_scores], None)})
    diff = a_scores - b_scores
    se = diff.std() / math.sqrt(diff.size)
    assert d["OP"]["diff"] == pytest.approx(diff.mean())
    assert (d["OP"]["high"] - d["OP"]["low"]) / (2 * 1.959964 * se) == pytest.approx(1.0, abs=0.05)


def test_unpaired_items_are_refused():
    a = {0: ItemScores([["x"]], [np.array([1.0])], None)}
    b = {0: ItemScores([["y"]], [np.array([1.0])], None)}
    with pytest.raises(ValueError, match="different test items"):
        paired_bootstrap(a, b)
    with pytest.raises(ValueError, match="share no seed"):
        paired_bootstrap(a, {1: b[0]})


def test_compare_prints_floors_cis_and_paired_differences_of_hand_made_runs(tmp_path):
    # Reference "lora": 3 seeds; "pmoe" beats it on task 0's final score by exactly one item per seed.
    ref, other = tmp_path / "lora", tmp_path / "pmoe"
    ref_ops, other_ops, other_bwts = [], [], []
    for seed in range(3):
        diag0 = [100.0] * 3 + [0.0] * 1
        base_final0 = [100.0] * (1 + seed % 2) + [0.0] * (3 - seed % 2)  # forgets
        final1 = [100.0, 0.0, 100.0, 100.0]
        better_final0 = list(base_final0)
        better_final0[2] = 100.0  # item 2 kept by pmoe
        r = _run_folder(ref / f"seed-{seed}", seed, [base_final0, final1], [diag0, final1])
        o = _run_folder(other / f"seed-{seed}", seed, [better_final0, final1], [diag0, final1])
        ref_ops.append(r["OP"])
        other_ops.append(o["OP"])
        other_bwts.append(o["BWT"])
    out = tmp_path / "cmp"
    text = write_comparison([other, ref], out, ["PMoE", "LoRA"], reference="LoRA")

    mean, half = np.mean(other_ops), 4.302652730 * np.std(other_ops, ddof=1) / math.sqrt(3)  # t_{0.975, 2}
    rows = {r[0]: r for r in csv.reader((out / "compare.csv").read_text().splitlines())}
    assert rows["row"][:3] == ["row", "majority", "zero_shot"]
    assert float(rows["OP"][3]) == pytest.approx(mean, abs=1e-4)
    assert float(rows["OP"][4]) == pytest.approx(half, abs=1e-4) and rows["OP"][5] == "3"
    assert float(rows["t0"][1]) == 50.0 and float(rows["t1"][2]) == 0.0 and float(rows["OP"][1]) == 37.5
    assert float(rows["BWT"][3]) == pytest.approx(np.mean(other_bwts), abs=1e-4)
    assert float(rows["wall minutes"][3]) == pytest.approx(2.0)  # 1, 2 and 3 minutes over the seeds
    op_line = next(line for line in text.splitlines() if line.startswith("| OP |"))
    assert f"{mean:.2f} ± {half:.2f}" in op_line

    paired = json.loads((out / "compare.json").read_text())["paired"]["differences"]["PMoE"]
    # By hand: per seed pmoe's OP is one item of four on one of two tasks higher: +25 / 2 = +12.5;
    # its BWT (seed convention, T=2) likewise +25 / 2 = +12.5. The paired difference is the same
    # for every seed and only item 2 of task 0 differs: resampled, it is drawn 0-4 times of 4.
    assert paired["OP"]["diff"] == pytest.approx(12.5) and paired["BWT"]["diff"] == pytest.approx(12.5)
    assert paired["OP"]["diff"] == pytest.approx(np.mean(other_ops) - np.mean(ref_ops))
    assert 0.0 <= paired["OP"]["low"] < 12.5 < paired["OP"]["high"] <= 50.0
    assert paired["OP"]["seeds"] == 3
    assert "| vs LoRA | Δ OP [95% CI] | Δ BWT [95% CI] | paired seeds |" in text
    assert "delta_RG" not in paired  # no general.json: no general column
    with pytest.raises(ValueError, match="--reference 'nope' is neither a column nor a run folder"):
        write_comparison([other, ref], out, ["PMoE", "LoRA"], reference="nope")
    # The reference may also be named by its run folder, whatever its column is called.
    by_folder = write_comparison([other, ref], tmp_path / "by-folder", ["PMoE", "LoRA"], reference=ref.name)
    assert "| vs LoRA | Δ OP [95% CI] | Δ BWT [95% CI] | paired seeds |" in by_folder


def test_paired_delta_rg_is_the_difference_of_the_mean_change_over_benchmarks(tmp_path):
    """Two benchmarks; each seed's base scores differ, PMoE's after-stream items are LoRA's with
    one HellaSwag item of 4 lost more: Delta R^G lower by 25 / 2 = 12.5 in every seed."""
    folders = {"pmoe": tmp_path / "pmoe", "lora": tmp_path / "lora"}
    deltas = {name: [] for name in folders}
    for seed in range(3):
        # general.json's items are 1/0 per item (BenchmarkScore); its scores are in points
        before = {"hellaswag": [1.0, 1.0, 0.0, float(seed % 2)], "piqa": [1.0, 0.0, 1.0]}
        after_lora = {"hellaswag": [1.0, 0.0, 0.0, float(seed % 2)], "piqa": [1.0, 0.0, 0.0]}
        after_pmoe = {"hellaswag": [0.0, 0.0, 0.0, float(seed % 2)], "piqa": [1.0, 0.0, 0.0]}
        for name, after in (("pmoe", after_pmoe), ("lora", after_lora)):
            folder = folders[name] / f"seed-{seed}"
            _run_folder(folder, seed, [[100.0, 0.0, 100.0, 0.0], [0.0, 100.0]], [[100.0] * 4, [0.0, 100.0]])
            general = {
                side: {b: {"metric": "acc", "items": items} for b, items in scores.items()}
                for side, scores in (("before", before), ("after", after))
            }
            (folder / "general.json").write_text(json.dumps(general))
            deltas[name].append(np.mean([100 * (np.mean(after[b]) - np.mean(before[b])) for b in before]))
    out = tmp_path / "cmp"
    text = write_comparison([folders["pmoe"], folders["lora"]], out, ["PMoE", "LoRA"], reference="LoRA")
    d = json.loads((out / "compare.json").read_text())["paired"]["differences"]["PMoE"]["delta_RG"]
    assert d["diff"] == pytest.approx(np.mean(deltas["pmoe"]) - np.mean(deltas["lora"])) == pytest.approx(-12.5)
    # Only HellaSwag's first item differs (by -100): resampled, the difference ranges from 0 to -50.
    assert -50.0 <= d["low"] < -12.5 < d["high"] <= 0.0 and d["seeds"] == 3
    assert "Δ Delta R^G [95% CI]" in text and "-12.50 [" in text
