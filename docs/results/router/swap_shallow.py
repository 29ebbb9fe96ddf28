"""Is forgetting in the shared shallow LoRA? Score each old task with the final model, then with
the shallow LoRA put back to what it was right after that task (deep experts and router final)."""

import json
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

from moecl.adapters.lora import LoRALinear
from moecl.config import config_from_options
from moecl.methods import METHODS
from moecl.models.loading import load_model
from moecl.training.run import Run, load_tasks

run_dir = Path(sys.argv[1])
cfg = config_from_options({k: v for k, v in json.loads((run_dir / "config.json").read_text()).items()})
tasks = load_tasks(cfg)
run = Run(cfg, Path(tempfile.mkdtemp()), tasks)
out = {}
T = len(tasks)
for i in range(T - 1):
    base, tok = load_model(cfg.model, seed=cfg.seed)
    model = METHODS[cfg.method](cfg).load(base, run_dir / "checkpoints" / f"task-{T - 1}").eval()
    final, _ = run.evaluate(model, tok, tasks[i], None, "final")
    old = load_file(str(run_dir / "checkpoints" / f"task-{i}" / "adapter_model.safetensors"))
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                m.lora_A.copy_(old[f"{name}.lora_A"])
                m.lora_B.copy_(old[f"{name}.lora_B"])
    swapped, _ = run.evaluate(model, tok, tasks[i], None, "swapped")
    out[tasks[i].name] = {"final": final, "shallow_from_own_task": swapped}
    print(tasks[i].name, out[tasks[i].name], flush=True)
Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
