"""PMoE as a method (issue 12): routing distillation, the router's own lr, what a run records."""

import json
import math

import pytest
import torch

from moecl.config import RunConfig
from moecl.methods.pmoe import PMoEMethod, padded_targets, route_distill_loss
from tests.conftest import build_tiny, tiny_run


def test_route_distill_loss_equals_the_hand_value():
    targets = padded_targets([[1.0], [0.6, 0.4]], 3, torch.zeros(1, dtype=torch.float64))
    assert targets.tolist() == [[1.0, 0.0, 0.0], [0.6, 0.4, 0.0]]
    probs = torch.tensor(
        [
            [[0.5, 0.3, 0.2], [0.7, 0.1, 0.2]],  # task 0: mean 0.6 / 0.2 / 0.2
            [[0.9, 0.05, 0.05], [0.3, 0.5, 0.2]],  # task 1: the first token is padding
            [[0.1, 0.1, 0.8], [0.1, 0.1, 0.8]],  # task 2, the one training: not distilled
        ],
        dtype=torch.float64,
    )
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    loss = route_distill_loss(probs, torch.tensor([0, 1, 2]), mask, targets)
    kl0 = -math.log(0.6)
    kl1 = 0.6 * math.log(0.6 / 0.3) + 0.4 * math.log(0.4 / 0.5)
    assert float(loss) == pytest.approx((kl0 + kl1) / 2, rel=1e-12)
    none_old = route_distill_loss(probs[2:], torch.tensor([2]), mask[2:], targets)
    assert float(none_old) == 0.0


def test_router_lr_puts_the_router_in_its_own_group():
    method = PMoEMethod(RunConfig(model="tiny-random", router_lr=0.05, target_modules=["q_proj"]))
    model = method.wrap(build_tiny("llama"))
    model.add_task()
    groups = method.parameter_groups(model)
    assert [g.get("lr") for g in groups] == [None, 0.05]
    assert groups[1]["params"] == [model.router.weight]
    assert len(groups[0]["params"]) + 1 == len(model.trainable_parameters())
    assert len(PMoEMethod(RunConfig(model="tiny-random")).parameter_groups(model)) == 1


def test_a_run_records_allocation_per_phase_and_the_newest_gate(tmp_path, monkeypatch):
    results, out = tiny_run(
        tmp_path, monkeypatch, "pmoe", replay=0.5, lambda_route=1.0, lambda_route_distill=1.0, freeze_router=True
    )
    phases = results["router_allocation_phases"]
    assert [len(m) for m in phases] == [1, 2, 3] and [len(m[-1]) for m in phases] == [1, 2, 3]
    assert phases[0] == [[1.0]] and results["router_allocation"] == phases[-1]
    assert results["diagonal_mass_phases"][-1] == pytest.approx(sum(phases[-1][k][k] for k in range(3)) / 3, abs=1e-6)
    assert len(results["router_entropy_phases"][2]) == 3
    assert (out / "router_allocation.png").stat().st_size > 0
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(0.0 <= s["gate_newest"] <= 1.0 for s in steps)
    assert {s["gate_newest"] for s in steps if s["task"] == 0} == {1.0}
    targets = json.loads((out / "checkpoints" / "task-2" / "route_targets.json").read_text())
    assert [len(row) for row in targets] == [1, 2, 3] and targets[0] == [1.0]


def test_pmoe_paper_preset_is_the_literal_router_and_options_still_win():
    from moecl.config import config_from_options

    paper = PMoEMethod(config_from_options({"preset": "pmoe-paper"})).adapter_config()
    literal = (paper.router_norm, paper.expert_init, paper.router_init, paper.freeze_router)
    assert literal == (False, "zero", "zero", False)
    assert config_from_options({"preset": "pmoe-paper", "lambda_route": "0.5"}).lambda_route == 0.5


def test_gates_recorded_in_generation_equal_a_separate_pass_over_each_prompt():
    """The allocation a run reports is read from generation's prefill (left-padded batches of
    similar length); it must equal the router's mean gate from a pass over each prompt alone."""
    from moecl import PMoEConfig, PMoEModel
    from moecl.evaluation.generation import generate
    from moecl.evaluation.routing import gate_summary
    from moecl.models.loading import tiny_random

    base, tokenizer = tiny_random()
    model = PMoEModel(base, PMoEConfig(tau=1, rank=2, alpha=4))
    model.add_task()
    model.add_task()
    with torch.no_grad():
        model.router.weight.normal_(std=2.0)  # a router that tells tokens apart
    prompts = ["a much longer prompt than the others", "mid length one", "hi", "the fourth prompt"]
    recorded = {}

    def keep(batch):
        means, _ = gate_summary(take(), batch["attention_mask"])
        for ids, mask, mean in zip(batch["input_ids"], batch["attention_mask"], means, strict=True):
            recorded[tokenizer.decode(ids[mask.bool()])] = mean

    with model.recording_gates() as take:
        generate(model, tokenizer, prompts, 3, 64, 3, on_batch=keep)
    assert sorted(recorded) == sorted(prompts)
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        alone = model.router_probs(ids)[0].mean(0)  # (experts,)
        torch.testing.assert_close(recorded[prompt], alone, rtol=1e-5, atol=1e-6)
    assert model.gate.probs is not None and model._recorded is None  # recording ended cleanly


def test_mean_gates_in_length_groups_equal_each_example_alone():
    """The distillation targets' per-example gates, computed in batches of neighbours in length,
    equal a pass over each example alone, in the examples' own order."""
    from moecl import PMoEConfig, PMoEModel
    from moecl.data.batches import Collator
    from moecl.data.trace import Example
    from moecl.methods.pmoe import masked_token_mean, mean_gates
    from moecl.models.loading import tiny_random

    base, tokenizer = tiny_random()
    model = PMoEModel(base, PMoEConfig(tau=1, rank=2, alpha=4))
    model.add_task()
    model.add_task()
    with torch.no_grad():
        model.router.weight.normal_(std=2.0)
    collator = Collator(tokenizer, 64, 8)
    pairs = [("a long prompt indeed", "x"), ("hi", "yes"), ("mid size", "no"), ("q", "a b")]
    examples = [Example(prompt, answer) for prompt, answer in pairs]
    means = mean_gates(model, collator, 0, examples, batch_size=2)
    assert means.shape == (4, 2)
    for row, example in enumerate(examples):
        batch = collator([(0, example)])
        mask = batch["attention_mask"]
        alone = masked_token_mean(model.router_probs(batch["input_ids"], mask), mask)
        torch.testing.assert_close(means[row], alone[0], rtol=1e-5, atol=1e-6)


def test_balanced_router_loss_averages_each_task_then_the_tasks():
    from moecl.methods.pmoe import router_loss

    probs = torch.tensor(
        [[[0.8, 0.2]], [[0.6, 0.4]], [[0.5, 0.5]], [[0.1, 0.9]]], dtype=torch.float64
    )  # (4 examples, 1 token, 2 experts)
    task_ids, mask = torch.tensor([1, 1, 1, 0]), torch.ones(4, 1)
    nll = [-math.log(0.2), -math.log(0.4), -math.log(0.5), -math.log(0.1)]
    assert float(router_loss(probs, task_ids, mask)) == pytest.approx(sum(nll) / 4, rel=1e-12)
    balanced = router_loss(probs, task_ids, mask, balance=True)
    assert float(balanced) == pytest.approx((sum(nll[:3]) / 3 + nll[3]) / 2, rel=1e-12)


def test_router_refit_moves_every_task_to_its_own_column_frozen_ones_included():
    from moecl.adapters.router import Router

    torch.manual_seed(0)
    router = Router(16)
    for _ in range(3):
        router.add_expert(freeze_old=True)  # columns 0 and 1 are frozen buffers, all zero
    centres = torch.randn(3, 16) * 3
    labels = torch.tensor([0] * 5 + [1] * 50 + [2] * 200)  # task 0 has the fewest tokens
    hidden = centres[labels] + torch.randn(len(labels), 16)
    counts = torch.bincount(labels).float()
    weights = 1.0 / counts[labels] / 3
    before = router(hidden[None])[0].detach()
    assert float(before[:5, 0].mean()) == pytest.approx(1 / 3)
    router.refit(hidden, labels, weights, steps=100, lr=0.05)
    after = router(hidden[None])[0]  # (tokens, experts)
    own = [float(after[labels == k, k].mean()) for k in range(3)]
    assert min(own) > 0.9, own
    assert router.frozen.abs().sum() > 0  # the frozen columns were refitted too
    assert router.bias.tolist() == [0.0, 0.0, 0.0]


def test_pmoe_refit_at_the_end_of_each_task_keeps_the_first_task_on_its_expert(tmp_path, monkeypatch):
    """On the smoke stream the refit puts most of each task's test prompts on its own expert (the
    task just trained and the replayed ones); without it the first task's column never trains and
    the three tasks share one gate (measured: diagonal mass 0.68 with the refit, 0.32 without)."""
    options = dict(replay=0.5, lambda_route=1.0, lambda_route_distill=1.0, freeze_router=True)
    refit, _ = tiny_run(tmp_path / "refit", monkeypatch, "pmoe", router_refit_steps=100, **options)
    plain, _ = tiny_run(tmp_path / "plain", monkeypatch, "pmoe", router_refit_steps=0, **options)
    own = [refit["router_allocation"][k][k] for k in range(3)]
    assert min(own) > 0.6, own  # tiny-random's h_tau separates the tasks less than a real model's
    assert refit["diagonal_mass_phases"][-1] > plain["diagonal_mass_phases"][-1] + 0.2
