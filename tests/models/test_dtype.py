"""Precision (issue 15, point 1): a bf16 base with fp32 adapters and router, end to end."""

import json

import pytest
import torch
from conftest import build_tiny, perturb_adapters, random_tokens

from moecl import PMoEConfig, PMoEModel
from moecl.adapters.state import adapter_state_dict
from moecl.models.loading import resolve_dtype
from tests.conftest import tiny_run


def test_bf16_base_keeps_fp32_adapters_and_matches_the_fp32_path_within_bf16_tolerance():
    models = {}
    for dtype in (torch.float32, torch.bfloat16):
        pmoe = PMoEModel(build_tiny("llama", dtype=dtype), PMoEConfig(tau=2, rank=2, alpha=4))
        pmoe.add_task()
        pmoe.add_task()
        perturb_adapters(pmoe, scale=0.3)  # the same seed: the same adapter values in both
        models[dtype] = pmoe
    half = models[torch.bfloat16]
    assert {t.dtype for t in adapter_state_dict(half).values()} == {torch.float32}
    assert half.base_model.get_input_embeddings().weight.dtype == torch.bfloat16
    ids = random_tokens(2, 9)
    full = models[torch.float32](input_ids=ids).logits
    low = half(input_ids=ids).logits.float()
    assert low.dtype == torch.float32 and not torch.equal(low, full)
    torch.testing.assert_close(low, full, rtol=0.05, atol=0.05)
    torch.testing.assert_close(half.router_probs(ids), models[torch.float32].router_probs(ids), rtol=0.05, atol=0.02)


def test_dtype_auto_is_fp32_on_cpu_and_fp16_needs_cuda():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32 and resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_dtype("fp16", cpu)


def test_a_bf16_run_trains_and_scores(tmp_path, monkeypatch):
    results, out = tiny_run(tmp_path, monkeypatch, "bf16", dtype="bf16", tasks=["sentiment", "parity"])
    assert len(results["R"]) == 2 and all(v is not None for v in results["R"][-1])
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(losses)))


def test_gradient_checkpointing_trains_to_the_same_losses(tmp_path, monkeypatch):
    from moecl.models.adapter_model import AdapterModel

    enabled = []
    real = AdapterModel.gradient_checkpointing_enable

    def spy(self, **kw):
        real(self, **kw)
        enabled.append(getattr(self.base_model, "is_gradient_checkpointing", True))

    monkeypatch.setattr(AdapterModel, "gradient_checkpointing_enable", spy)
    losses = {}
    for flag in (False, True):
        tasks = ["sentiment", "parity"]
        _, out = tiny_run(tmp_path, monkeypatch, f"gc-{flag}", gradient_checkpointing=flag, tasks=tasks)
        losses[flag] = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert enabled == [True]  # only the run that asked for it
    assert losses[True] == pytest.approx(losses[False], rel=1e-4, abs=1e-5)
