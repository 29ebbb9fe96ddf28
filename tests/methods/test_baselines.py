"""The baselines of seed 001's Table 1 as plug-ins: their losses, what they freeze, what they see."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.config import METHOD_NAMES, RunConfig
from moecl.data.trace import Example, Task
from moecl.methods import METHODS
from moecl.methods.full import SeqFTMethod
from moecl.methods.icl import ICLMethod
from moecl.methods.lora import OLoRAMethod, olora_penalties
from moecl.models.loading import byte_tokenizer
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig
from moecl.training import run as run_module
from tests.conftest import build_tiny, perturb_adapters, random_tokens, tiny_run


def _run(tmp_path: Path, monkeypatch, **options):
    return tiny_run(tmp_path, monkeypatch, options["method"], rank=2, alpha=4.0, **options)


def test_every_method_is_registered_and_seq_ft_defaults_to_the_papers_lr():
    assert set(METHODS) == set(METHOD_NAMES)
    assert RunConfig(method="seq-ft").lr == 1e-5
    assert RunConfig(method="seq-lora").lr == 3e-3
    assert RunConfig(method="seq-ft", lr=2e-5).lr == 2e-5


def test_olora_loss_equals_the_hand_computed_value():
    r, hidden, blocks = 2, 32, 2
    model = PMoEModel(build_tiny("llama", layers=blocks), PMoEConfig.paper(tau=0, rank=r, gate="sum"))
    model.add_task()
    model.add_task()
    model.add_task()  # two frozen adapters and the new one in every bank
    banks = [m for m in model.modules() if isinstance(m, LoRAExpertBank)]
    assert len(banks) == 2 * blocks  # q and v of every block (tau = 0)
    with torch.no_grad():
        for bank in banks:
            bank.frozen_A.fill_(1.0)
            bank.expert_A.fill_(0.5)
            bank.expert_B.fill_(2.0)
    # A_i A_t^T has r x r entries, each sum over `hidden` inputs of 1 * 0.5; 2 earlier tasks per bank.
    orth_by_hand = len(banks) * 2 * r * r * hidden * 0.5
    out_features = {b.out_features for b in banks}
    l2_by_hand = sum(r * hidden * 0.25 + b.out_features * r * 4.0 for b in banks)
    orth, l2 = olora_penalties(model)
    assert out_features == {32, 16}  # q: 4 heads x 8; v: 2 kv heads x 8
    assert orth.item() == pytest.approx(orth_by_hand) and l2.item() == pytest.approx(l2_by_hand)
    method = OLoRAMethod(RunConfig(method="o-lora", lambda_orth=0.5, lambda_l2=0.1))
    lm = torch.tensor(1.25)
    total = method.loss(model, {}, lm)
    assert total.item() == pytest.approx(1.25 + 0.5 * orth_by_hand + 0.1 * l2_by_hand)
    total.backward()
    assert banks[0].expert_A.grad is not None and banks[0].expert_A.grad.abs().sum() > 0


def test_task_gate_uses_only_the_active_tasks_adapter_and_sum_gate_adds_them():
    ids = random_tokens(2, 6)
    base = build_tiny("llama", layers=2)
    with torch.no_grad():
        base_logits = base(ids).logits
    model = PMoEModel(base, PMoEConfig(tau=0, rank=2, gate="task"))
    model.add_task()
    model.add_task()
    perturb_adapters(model)
    with torch.no_grad():
        model.active_task = 0
        first = model(ids).logits
        model.active_task = 1
        second = model(ids).logits
        assert not torch.allclose(first, second)
        for bank in (m for m in model.modules() if isinstance(m, LoRAExpertBank)):
            bank.expert_B.zero_()  # remove task 1's adapter
        assert torch.equal(model(ids).logits, base_logits)  # active task 1 now adds nothing
        model.active_task = 0
        assert torch.equal(model(ids).logits, first)  # task 0 never saw task 1's adapter
    with pytest.raises(ValueError, match="has no expert"):
        model.active_task = 2


def test_earlier_olora_adapters_stay_bit_identical(tmp_path, monkeypatch):
    results, out = _run(tmp_path, monkeypatch, method="o-lora", lambda_l2=0.1, weight_decay=0.1, replay=0.25)
    after = [load_file(str(out / "checkpoints" / f"task-{t}" / "moecl_adapter.safetensors")) for t in range(3)]
    q = next(k for k in after[0] if k.endswith("q_proj.experts_A")).rpartition(".")[0]
    r = after[0][f"{q}.experts_A"].shape[0]  # one adapter per task, all stacked on disk
    for t in (1, 2):
        # Task s's adapter as saved when task s ended, against the same rows after task t.
        earlier_A = torch.cat([after[s][f"{q}.experts_A"][s * r : (s + 1) * r] for s in range(t)])
        earlier_B = torch.cat([after[s][f"{q}.experts_B"][:, s * r : (s + 1) * r] for s in range(t)], 1)
        assert torch.equal(after[t][f"{q}.experts_A"][: t * r], earlier_A)
        assert torch.equal(after[t][f"{q}.experts_B"][:, : t * r], earlier_B)
        assert after[t][f"{q}.experts_B"][:, t * r :].abs().sum() > 0  # task t's own adapter trained
    assert results["router_allocation"] is None and results["BWT"] is not None


def test_replay_holds_a_share_of_every_past_task_and_nothing_of_future_ones(tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real = run_module.train_task

    def spy(accelerator, method, model, collator, items, *args, **kw):
        seen.append([t for t, _ in items])
        return real(accelerator, method, model, collator, items, *args, **kw)

    monkeypatch.setattr(run_module, "train_task", spy)
    _run(tmp_path, monkeypatch, method="seq-lora", replay=0.25)
    assert len(seen) == 3
    for t, ids in enumerate(seen):
        assert ids.count(t) == 8  # the task's own training data
        for past in range(t):
            assert ids.count(past) == math.ceil(0.25 * 8)
        assert not any(i > t for i in ids)
    memory = json.loads((tmp_path / "seq-lora" / "replay.json").read_text())
    assert [m["task"] for m in memory] == [0, 0, 1, 1, 2, 2]


def test_mtl_trains_once_on_every_task(tmp_path, monkeypatch):
    seen: list[list[int]] = []
    real = run_module.train_task
    monkeypatch.setattr(
        run_module,
        "train_task",
        lambda acc, method, model, collator, items, *a, **k: (
            seen.append([t for t, _ in items]) or real(acc, method, model, collator, items, *a, **k)
        ),
    )
    results, _ = _run(tmp_path, monkeypatch, method="mtl", replay=0.0)
    assert [sorted(set(ids)) for ids in seen] == [[0, 1, 2]] and len(seen[0]) == 24
    assert len(results["R"]) == 1 and None not in results["R"][0]
    assert results["OP"] == pytest.approx(sum(results["R"][0]) / 3) and results["BWT"] is None


def test_icl_never_updates_a_weight(tmp_path, monkeypatch):
    def no_optimizer(*args, **kwargs):
        raise AssertionError("icl built an optimizer")

    monkeypatch.setattr(torch.optim, "AdamW", no_optimizer)
    monkeypatch.setattr(run_module, "train_task", no_optimizer)
    results, out = _run(tmp_path, monkeypatch, method="icl", icl_shots=3)
    assert results["trainable_params"] == 0 and len(results["R"]) == 1 and None not in results["R"][0]
    assert not list((out / "checkpoints").rglob("*.safetensors"))
    predictions = (out / "predictions" / "after-task-0" / "sentiment.jsonl").read_text().splitlines()
    assert len(predictions) == 6


def test_icl_prompts_hold_k_demonstrations_and_drop_them_to_fit():
    tok = byte_tokenizer()
    task = Task("t", "accuracy", [Example(f"Q{i}:", f" A{i}") for i in range(10)], [])
    method = ICLMethod(RunConfig(method="icl", icl_shots=6, icl_max_prompt_tokens=1000))
    (prompt,) = method.eval_prompts(task, ["Qx:"], tok)
    demos = method.demonstrations(task)
    assert prompt == "".join(d.prompt + d.answer + "\n\n" for d in demos) + "Qx:" and len(demos) == 6
    tight = ICLMethod(RunConfig(method="icl", icl_shots=6, icl_max_prompt_tokens=3 + 2 * 8))
    (short,) = tight.eval_prompts(task, ["Qx:"], tok)  # room for two 8-byte demonstrations
    assert short == "".join(d.prompt + d.answer + "\n\n" for d in demos[:2]) + "Qx:"


def test_per_task_lora_scores_each_task_with_its_own_adapter(tmp_path, monkeypatch):
    results, _ = _run(tmp_path, monkeypatch, method="per-task-lora", replay=0.0)
    R = results["R"]
    assert all(R[t][i] == R[i][i] for t in range(3) for i in range(t + 1))  # nothing later touches task i


def test_seq_ft_trains_every_weight_and_reloads_them(tmp_path):
    from moecl.models.loading import load_model

    method = SeqFTMethod(RunConfig(method="seq-ft"))
    base, _ = load_model("tiny-random", seed=0)
    model = method.wrap(base)
    trainable, total = method.parameter_counts(model)
    assert trainable == total == sum(p.numel() for p in base.parameters())
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    method.save(model, tmp_path / "ckpt")
    fresh, _ = load_model("tiny-random", seed=0)
    loaded = method.load(fresh, tmp_path / "ckpt")
    ids = random_tokens(2, 5)
    assert torch.equal(loaded(ids).logits, model(ids).logits)
