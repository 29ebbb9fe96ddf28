"""PMoE experts exported as PEFT LoRA adapters and merged models (issue 16, point 3)."""

import pytest
import torch
from conftest import build_tiny, perturb_adapters, random_tokens
from peft import PeftModel
from transformers import AutoModelForCausalLM

from moecl import PMoEConfig, PMoEModel
from moecl.models.export import export_peft, merge_into_base, parse_gate


def _pmoe(family: str = "llama") -> PMoEModel:
    pmoe = PMoEModel(build_tiny(family), PMoEConfig(tau=2, rank=2, alpha=4))
    for _ in range(3):
        pmoe.add_task()
    perturb_adapters(pmoe, scale=0.3)
    return pmoe


def _under_gate(pmoe: PMoEModel, gate: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """PMoE's logits with the router replaced by a fixed gate on every token."""
    real = pmoe.router.forward
    pmoe.router.forward = lambda h: gate.expand(*h.shape[:-1], -1)
    try:
        return pmoe(input_ids=ids).logits
    finally:
        pmoe.router.forward = real


@pytest.mark.parametrize("gate", [[0.0, 1.0, 0.0], [0.2, 0.5, 0.3]])
def test_exported_adapter_loaded_by_peft_equals_pmoe_under_that_gate_and_merges(tmp_path, gate):
    pmoe = _pmoe()
    gate = torch.tensor(gate)
    ids = random_tokens(2, 7)
    expected = _under_gate(pmoe, gate, ids)
    export_peft(pmoe, gate, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(build_tiny("llama"), tmp_path / "adapter")
    torch.testing.assert_close(peft_model(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    merged = peft_model.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    assert (gate == 1).any() or peft_model.peft_config["default"].rank_pattern  # a mixture is rank T*r there


def test_merged_folder_equals_the_adapter(tmp_path, family):
    pmoe = _pmoe(family)
    gate = torch.tensor([0.0, 0.0, 1.0])
    ids = random_tokens(2, 7)
    expected = _under_gate(pmoe, gate, ids)
    merge_into_base(pmoe, gate).save_pretrained(tmp_path / "merged")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)


def test_gate_text_is_checked():
    assert parse_gate("0.5,0.5", 2).tolist() == [0.5, 0.5]
    with pytest.raises(ValueError, match="3 non-negative numbers that sum to 1"):
        parse_gate("0.5,0.6,0", 3)


def test_export_command_writes_an_adapter_peft_loads(tmp_path, monkeypatch):
    from moecl.cli.main import main
    from moecl.models.loading import tiny_random
    from tests.conftest import tiny_run

    _, out = tiny_run(tmp_path, monkeypatch, "pmoe", tasks=["sentiment", "parity"])
    assert main(["export", str(out), "--expert", "2", "--out", str(tmp_path / "e2")]) == 0
    assert main(["export", str(out), "--task", "parity", "--out", str(tmp_path / "mix")]) == 0
    assert main(["export", str(out), "--expert", "3", "--out", str(tmp_path / "bad")]) == 2
    base, _ = tiny_random(0)
    adapter = PeftModel.from_pretrained(base, tmp_path / "e2")
    assert adapter(input_ids=random_tokens(1, 5, seed=4)).logits.shape[-1] == base.config.vocab_size
