"""How PMoE grows (issue 12): copied experts and columns, a set share, frozen and aligned columns."""

import math

import pytest
import torch
from conftest import build_tiny, perturb_adapters, random_tokens
from safetensors.torch import load_file, save_file

from moecl import PMoEConfig, PMoEModel
from moecl.adapters import LoRAExpertBank
from moecl.adapters.router import Router


def _pmoe(experts: int = 0, family: str = "llama", **kw) -> PMoEModel:
    pmoe = PMoEModel(build_tiny(family), PMoEConfig.paper(tau=2, rank=2, alpha=4, **kw))
    for _ in range(experts):
        pmoe.add_task()
    return pmoe


def _probe(seed: int = 5) -> dict[str, torch.Tensor]:
    ids = random_tokens(3, 6, seed=seed)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _banks(pmoe: PMoEModel) -> list[LoRAExpertBank]:
    return list(pmoe.deep_banks())


def test_copy_growth_leaves_logits_identical_and_copies_the_most_used_expert(family):
    pmoe = _pmoe(2, family, expert_init="copy", router_init="copy")
    perturb_adapters(pmoe, scale=0.4)
    ids = random_tokens(2, 7, seed=3)
    probe = _probe()
    before = pmoe(input_ids=ids).logits
    gate = pmoe.router_probs(probe["input_ids"], probe["attention_mask"])
    mask = probe["attention_mask"].bool()
    source = int(gate[mask].mean(0).argmax())
    old_bias = float(pmoe.router.bias[source])
    pmoe.add_task(probe)
    after = pmoe(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    for bank in _banks(pmoe):
        rows = slice(source * 2, source * 2 + 2)
        assert torch.equal(bank.expert_A, bank.frozen_A[rows]) and torch.equal(bank.expert_B, bank.frozen_B[:, rows])
    columns = pmoe.router.columns()
    assert torch.equal(columns[-1], columns[source])
    assert pmoe.router.bias[-1] == pmoe.router.bias[source] == pytest.approx(old_bias - math.log(2))


def test_zero_growth_is_the_paper_whatever_the_probe():
    pmoe = _pmoe(1)
    perturb_adapters(pmoe, scale=0.4)
    pmoe.add_task(_probe())
    assert torch.count_nonzero(pmoe.router.columns()[-1]) == 0 and pmoe.router.bias[-1] == 0
    assert pmoe.router.weight.shape[0] == 2  # every column keeps training
    assert all(torch.count_nonzero(b.expert_B) == 0 for b in _banks(pmoe))


def test_share_growth_gives_the_new_expert_its_share_on_the_probe():
    pmoe = _pmoe(2, router_init="share", router_share=0.3)
    perturb_adapters(pmoe, scale=0.4)
    probe = _probe()
    pmoe.add_task(probe)
    gate = pmoe.router_probs(probe["input_ids"], probe["attention_mask"])
    newest = gate[..., -1][probe["attention_mask"].bool()]
    # The offset is set on the mean log-partition, so the share holds for a typical token.
    assert float(newest.mean()) == pytest.approx(0.3, abs=0.08)
    assert torch.count_nonzero(pmoe.router.columns()[-1]) == 0


def test_frozen_router_columns_and_old_experts_bit_identical_after_adamw_with_weight_decay():
    pmoe = _pmoe(2, freeze_router=True)
    perturb_adapters(pmoe, scale=0.4)
    pmoe.add_task()
    assert pmoe.router.weight.shape[0] == 1 and pmoe.router.frozen.shape[0] == 2
    frozen_columns = pmoe.router.frozen.clone()
    frozen = [(b.frozen_A.clone(), b.frozen_B.clone()) for b in _banks(pmoe)]
    newest = pmoe.router.weight.detach().clone()
    opt = torch.optim.AdamW(pmoe.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    pmoe.train()
    for step in range(3):
        ids = random_tokens(4, 8, seed=10 + step)
        pmoe(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(pmoe.router.frozen, frozen_columns)
    for bank, (a, b) in zip(_banks(pmoe), frozen, strict=True):
        assert torch.equal(bank.frozen_A, a) and torch.equal(bank.frozen_B, b)
    assert not torch.equal(pmoe.router.weight, newest)  # the new column did train


def test_align_newest_rescales_to_the_old_non_zero_columns_norm():
    router = Router(8)
    for _ in range(3):
        router.add_expert(freeze_old=True)
    with torch.no_grad():
        router.frozen[1] = torch.full((8,), 0.5)  # norm sqrt(2); column 0 stays zero (never trained)
        router.weight[0] = torch.full((8,), 2.0)  # norm sqrt(32)
    router.align_newest()
    assert float(router.columns()[-1].detach().norm()) == pytest.approx(math.sqrt(2))
    assert torch.allclose(router.weight[0], torch.full((8,), 0.5))


def test_router_with_offsets_is_softmax_of_columns_plus_bias():
    router = Router(4, normalize=False)
    router.add_expert(torch.tensor([1.0, 0, 0, 0]))
    router.add_expert(torch.tensor([0, 1.0, 0, 0]), bias=0.5, freeze_old=True)
    h = torch.randn(2, 3, 4)
    expected = torch.softmax(torch.stack([h[..., 0], h[..., 1] + 0.5], -1), -1)
    torch.testing.assert_close(router(h), expected)


def test_grown_models_round_trip_and_old_folders_without_offsets_still_load(tmp_path):
    pmoe = _pmoe(3, freeze_router=True, router_init="share")
    perturb_adapters(pmoe)
    pmoe.save_pretrained(tmp_path)
    loaded = PMoEModel.from_pretrained(build_tiny("llama"), tmp_path)
    ids = random_tokens(2, 5)
    assert torch.equal(loaded(input_ids=ids).logits, pmoe(input_ids=ids).logits)
    # A folder written before the router had frozen columns and offsets: both keys absent.
    old = _pmoe(2)
    perturb_adapters(old)
    with torch.no_grad():
        old.router.bias.zero_()
    old.save_pretrained(tmp_path / "old")
    weights = _legacy_layout(old)
    del weights["router.frozen"], weights["router.bias"]
    save_file(weights, str(tmp_path / "old" / "moecl_adapter.safetensors"))
    reloaded = PMoEModel.from_pretrained(build_tiny("llama"), tmp_path / "old")
    assert torch.equal(reloaded(input_ids=ids).logits, old(input_ids=ids).logits)


def _legacy_layout(model: PMoEModel) -> dict[str, torch.Tensor]:
    """What folders held before the stacked layout: each module's tensors as it holds them (an
    expert bank's frozen_A + expert_A split at the training expert, the router's frozen + weight)."""
    from moecl.adapters.state import adapter_state_dict

    return {k: v.detach().contiguous().clone() for k, v in adapter_state_dict(model).items()}


def test_experts_are_saved_as_one_stack_whichever_trains_and_old_split_folders_load(tmp_path):
    pmoe = _pmoe(3, freeze_router=True)
    perturb_adapters(pmoe)
    pmoe.save_pretrained(tmp_path / "new")
    weights = load_file(str(tmp_path / "new" / "moecl_adapter.safetensors"))
    bank_name, bank = next((n, m) for n, m in pmoe.named_modules() if isinstance(m, LoRAExpertBank))
    r = pmoe.adapter_config.rank
    assert not any(k.endswith(("frozen_A", "expert_A", "router.weight", "router.frozen")) for k in weights)
    assert weights[f"{bank_name}.experts_A"].shape == (3 * r, bank.in_features)
    assert torch.equal(weights[f"{bank_name}.experts_A"][2 * r :], bank.expert_A)  # the training one, last
    assert torch.equal(weights[f"{bank_name}.experts_B"][:, : 2 * r], bank.frozen_B)
    assert torch.equal(weights["router.columns"], pmoe.router.columns())
    # The folder the same model wrote before the stacked layout loads to the same model.
    pmoe.save_pretrained(tmp_path / "old")
    save_file(_legacy_layout(pmoe), str(tmp_path / "old" / "moecl_adapter.safetensors"))
    ids = random_tokens(2, 5)
    for folder in ("new", "old"):
        loaded = PMoEModel.from_pretrained(build_tiny("llama"), tmp_path / folder)
        assert torch.equal(loaded(input_ids=ids).logits, pmoe(input_ids=ids).logits), folder
        assert torch.equal(loaded.router.frozen, pmoe.router.frozen)  # split as it trains, again
        assert {n for n, _ in loaded.named_parameters() if "expert" in n} == {
            n for n, _ in pmoe.named_parameters() if "expert" in n
        }


def test_growth_options_are_checked():
    with pytest.raises(ValueError, match="expert_init='clone' is not one of zero, copy"):
        PMoEConfig(expert_init="clone")
    with pytest.raises(ValueError, match="router_share is the new expert's gate"):
        PMoEConfig(router_share=1.0)


def test_detached_router_input_keeps_routing_losses_out_of_the_shallow_lora():
    grads = {}
    for detach in (False, True):
        pmoe = _pmoe(2, router_detach=detach)
        perturb_adapters(pmoe, scale=0.4)
        probs = pmoe(input_ids=random_tokens(2, 6)) and pmoe.gate.probs
        (-probs[..., 1].log().mean()).backward()  # a routing loss alone (Eq. 7 towards expert 2)
        shallow = [m.lora_B.grad for m in pmoe.modules() if type(m).__name__ == "LoRALinear"]
        grads[detach] = (shallow, pmoe.router.weight.grad)
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in grads[False][0])
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads[True][0])
    assert torch.count_nonzero(grads[True][1]) > 0  # the router itself still learns
