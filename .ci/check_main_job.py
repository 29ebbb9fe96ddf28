"""CI: the main job's run folder is complete, and its cache holds what the main job fetched
(nothing but the converted model). Usage: python .ci/check_main_job.py RUN_DIR CACHE_DIR"""

import json
import math
import sys
from pathlib import Path

from moecl.data.mini_trace import DEFAULT_TASKS

run, cache = Path(sys.argv[1]), Path(sys.argv[2])
results = json.loads((run / "results.json").read_text())
problems = []
if results.get("tasks") != DEFAULT_TASKS:
    problems.append(f"tasks {results.get('tasks')} != {DEFAULT_TASKS}")
if results.get("model") != "smollm2-135m" or results.get("benchmark") != "mini-trace":
    problems.append(f"model/benchmark {results.get('model')}/{results.get('benchmark')}")
R = results.get("R") or []
k = len(DEFAULT_TASKS)
cells = [row[j] if j < len(row) else None for i, row in enumerate(R[:k]) for j in range(i + 1)]
if len(R) != k or any(not isinstance(c, (int, float)) or math.isnan(c) for c in cells):
    problems.append(f"R is not a complete {k}x{k} lower triangle: {R}")
for key in ("OP", "BWT"):
    if not isinstance(results.get(key), (int, float)) or math.isnan(results[key]):
        problems.append(f"{key} = {results.get(key)}")
floors = results.get("floors") or {}
if set(floors) != set(DEFAULT_TASKS) or any({"majority", "zero_shot"} - set(f) for f in floors.values()):
    problems.append(f"floors incomplete: {floors}")
for t in range(k):
    for task in DEFAULT_TASKS[: t + 1]:
        if not (run / "predictions" / f"after-task-{t}" / f"{task}.jsonl").is_file():
            problems.append(f"no predictions/after-task-{t}/{task}.jsonl")
downloads = sorted(p.name for p in (cache / "data" / "downloads").glob("*")) if (cache / "data").is_dir() else []
if downloads:
    problems.append(f"the main job downloaded {downloads}; it must need nothing but the model wheel")
if problems:
    sys.exit("main job check failed:\n  " + "\n  ".join(problems))
print(f"main job check: {run}/results.json complete (R {k}x{k}, OP {results['OP']:.1f}), nothing downloaded")
