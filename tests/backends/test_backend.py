"""moecl changes only what it is handed: stock modules by default, the CPU backend applied to one
model by one call that can be undone, and the same command giving the same numbers."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_tiny, random_tokens

from moecl import PMoEConfig, PMoEModel
from moecl.backends import apply_backend, backend_for, cpu
from moecl.backends.cpu.adapters import FusedExpertBank, MergedLoRALinear
from moecl.backends.cpu.linear import OneDNNLinear

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _logits_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    ids = random_tokens(2, 10)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model.train()
    logits = model(input_ids=ids, attention_mask=mask).logits
    grads = torch.autograd.grad(logits.square().mean(), [p for p in model.parameters() if p.requires_grad])
    return logits.detach(), list(grads)


def test_a_second_model_is_untouched_by_moecl_wrapping_and_training_a_first_one():
    bystander = build_tiny("llama", seed=3)
    before = _logits_and_grads(bystander)
    first = PMoEModel(build_tiny("llama"), PMoEConfig(tau=0.5, rank=2, alpha=4, target_modules=["all-linear"]))
    first.add_task()
    applied = cpu.apply(first, cpu.PIECES)  # every piece, whatever this CPU's default
    assert applied.changes["linear"] > 0 and applied.changes["adapters"] > 0
    optimizer = torch.optim.AdamW(first.trainable_parameters(), lr=1e-2)
    for _ in range(2):
        ids = random_tokens(2, 10)
        first(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = _logits_and_grads(bystander)
    assert torch.equal(before[0], after[0])
    assert all(torch.equal(a, b) for a, b in zip(before[1], after[1], strict=True))
    assert not any(isinstance(m, OneDNNLinear) for m in bystander.modules())


@pytest.mark.parametrize(
    ("kernels", "device", "dtype"),
    [
        ("stock", CPU, torch.float32),
        ("auto", CPU, torch.bfloat16),
        ("auto", CPU, torch.float16),
        ("auto", CUDA, torch.float32),
        ("auto", CUDA, torch.bfloat16),
    ],
)
def test_gpus_half_precision_and_stock_never_enter_the_backend(kernels, device, dtype):
    assert backend_for(kernels, device, dtype) == "stock"
    model = PMoEModel(build_tiny("llama"), PMoEConfig(tau=0.5, rank=2, alpha=4, target_modules=["all-linear"]))
    model.add_task()
    reference = copy.deepcopy(model)
    assert apply_backend(model, kernels, device, dtype).changes == {}
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert model.base_model.config._attn_implementation == "sdpa"


def test_a_compiled_model_keeps_its_stock_modules():
    model = build_tiny("llama")
    model.compile()
    assert apply_backend(model, "cpu", CPU, torch.float32).changes == {}


def test_the_backend_converts_a_pmoe_model_and_undoes_it_exactly():
    model = PMoEModel(build_tiny("llama"), PMoEConfig(tau=0.5, rank=2, alpha=4, target_modules=["all-linear"]))
    model.add_task()
    model.add_task()
    stock_types = [type(m) for m in model.modules()]
    stock = _logits_and_grads(model)
    applied = apply_backend(model, "cpu", CPU, torch.float32)
    assert any(isinstance(m, MergedLoRALinear) for m in model.modules())
    assert any(isinstance(m, FusedExpertBank) for m in model.modules())
    fast = _logits_and_grads(model)
    torch.testing.assert_close(fast[0], stock[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[1], stock[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    applied.undo()
    assert [type(m) for m in model.modules()] == stock_types
    again = _logits_and_grads(model)
    assert torch.equal(again[0], stock[0])


def test_importing_moecl_and_its_help_change_nothing_in_torch_or_transformers():
    script = """
import json, sys, torch, transformers.models.llama.modeling_llama as llama
from transformers import AttentionInterface
rotary, attention = llama.apply_rotary_pos_emb, dict(AttentionInterface._global_mapping)
import moecl, moecl.models, moecl.training.run, moecl.backends
from moecl.cli.main import main
try:
    main(["run", "--help"])
except SystemExit:
    pass
from moecl.models.loading import load_model
model, _ = load_model("tiny-random")
print(json.dumps({
    "rotary": llama.apply_rotary_pos_emb is rotary,
    "attention": dict(AttentionInterface._global_mapping) == attention,
    "stock_linear": all(type(m).__module__.startswith("torch") for m in model.modules() if "Linear" in str(type(m))),
    "mkl_env": "MKL_CBWR" in __import__("os").environ,
    "backend_imported": "moecl.backends.cpu" in sys.modules,
}), file=sys.stderr)
"""
    env = {k: v for k, v in os.environ.items() if k != "MKL_CBWR"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    state = json.loads(done.stderr.strip().splitlines()[-1])
    assert state == {
        "rotary": True,
        "attention": True,
        "stock_linear": True,
        "mkl_env": False,
        "backend_imported": False,
    }


@pytest.mark.parametrize("kernels", ["auto", "cpu"])
def test_the_smoke_preset_gives_the_same_results_in_fresh_processes(tmp_path, kernels):
    """The default path, and the CPU backend, are bit-identical from one process to the next (the
    MKL patch was not)."""
    env = {**os.environ, "MOECL_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("MOECL_MKL_UNLOCK", None)
    numbers = []
    for i in range(3):
        out = tmp_path / f"run-{i}"
        args = ["run", "--preset", "smoke", "epochs=4", "train_size=24", "test_size=12", f"kernels={kernels}"]
        args += ["--out", str(out)]
        done = subprocess.run(
            [sys.executable, "-m", "moecl.cli.main", *args], env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr
        results = json.loads((out / "results.json").read_text())
        assert results["kernels"]["backend"] == backend_for(kernels, CPU, torch.float32)
        train = [{k: v for k, v in t.items() if k != "seconds"} for t in results["train"]]
        numbers.append({**{k: results[k] for k in ("R", "OP", "BWT", "router_allocation")}, "train": train})
    for other in numbers[1:]:
        assert json.dumps(other["R"]) == json.dumps(numbers[0]["R"])
        assert [t["last_loss"] for t in other["train"]] == [t["last_loss"] for t in numbers[0]["train"]]
        assert other == numbers[0]


def test_a_run_with_stock_kernels_records_that_nothing_was_converted(tmp_path, monkeypatch):
    from moecl.backends.cpu.adapters import SWAPS
    from moecl.training import run as run_module
    from tests.conftest import tiny_run

    seen = []
    real = run_module.Run.evaluate_row

    def spy(self, model, *args, **kwargs):
        seen.append({type(m) for m in model.modules()})
        return real(self, model, *args, **kwargs)

    monkeypatch.setattr(run_module.Run, "evaluate_row", spy)
    results, _ = tiny_run(tmp_path, monkeypatch, "stock", kernels="stock")
    assert results["kernels"] == {"requested": "stock", "backend": "stock", "changes": {}, "process": {}}
    backend_types = {OneDNNLinear, *(fused for _, fused in SWAPS)}
    assert seen and all(not (types & backend_types) for types in seen)


def test_auto_takes_the_cpu_backend_only_on_amd_cpus(monkeypatch):
    from moecl.backends.cpu import mkl

    monkeypatch.setattr(mkl, "cpu_vendor", lambda: "AuthenticAMD")
    assert backend_for("auto", CPU, torch.float32) == "cpu"
    assert backend_for("auto", CPU, torch.bfloat16) == "stock"
    monkeypatch.setattr(mkl, "cpu_vendor", lambda: "GenuineIntel")
    assert backend_for("auto", CPU, torch.float32) == "stock"
    assert backend_for("cpu", CPU, torch.float32) == "cpu"
    assert backend_for("cpu", CUDA, torch.float32) == "stock"
