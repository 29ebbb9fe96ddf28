"""EWC, LwF, A-GEM and LoRAMoE as plug-ins: each loss or update against a hand computation on a
tiny model, and each run through the template, interrupted mid-task and resumed to the same
numbers."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from moecl.adapters.mixture import LoRAMixtureLinear, localized_balance
from moecl.config import RunConfig
from moecl.data.batches import Collator, answer_loss
from moecl.data.trace import Example
from moecl.methods import METHODS
from moecl.methods.regularized import AGEMMethod, EWCMethod, LwFMethod, diagonal_fisher, distillation, project
from moecl.models.loramoe import LoRAMoEConfig, LoRAMoEModel
from tests.conftest import VOCAB, build_tiny, random_tokens, tiny_run


def _config(method: str, **options) -> RunConfig:
    return RunConfig(method=method, model="tiny-random", rank=2, alpha=4.0, **options)


def _batch(seed: int, rows: int = 2, width: int = 8, task: int = 0) -> dict[str, torch.Tensor]:
    ids = random_tokens(rows, width, seed)
    labels = torch.full_like(ids, -100)
    labels[:, -3:] = ids[:, -3:]
    return {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "labels": labels,
        "task_ids": torch.full((rows,), task),
    }


class _Tokens:
    """A tokenizer over the tiny model's vocabulary: each character one id."""

    eos_token_id, pad_token_id = 2, 0

    def __call__(self, text: str, add_special_tokens: bool = False):
        return {"input_ids": [3 + ord(c) % (VOCAB - 3) for c in text]}


def _examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    return [Example(f"q{int(torch.randint(0, 999, (1,), generator=g))}:", f" a{i}") for i in range(n)]


# -- EWC ---------------------------------------------------------------------------------------


def test_ewc_penalty_is_lambda_half_fisher_times_squared_distance():
    method = EWCMethod(_config("ewc", lambda_ewc=3.0))
    model = method.wrap(build_tiny("llama"))
    named = dict(model.named_trainable_parameters())
    method.fisher = {n: torch.full_like(p, 0.5) for n, p in named.items()}
    method.anchor = {n: p.detach() - 0.1 for n, p in named.items()}  # every weight 0.1 from its anchor
    elements = sum(p.numel() for p in named.values())
    lm = torch.tensor(2.0)
    assert float(method.loss(model, {}, lm)) == pytest.approx(2.0 + 3.0 / 2 * 0.5 * 0.01 * elements, rel=1e-5)


def test_ewc_fisher_is_the_mean_squared_batch_gradient_summed_over_tasks():
    method = EWCMethod(_config("ewc", micro_batch_size=2, ewc_samples=4))
    model = method.wrap(build_tiny("llama"))
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.normal_(0, 0.1)  # B != 0, so A has a gradient too
    collator = Collator(_Tokens(), 16, 4)
    examples = _examples(4)
    by_hand = {n: torch.zeros_like(p) for n, p in model.named_trainable_parameters()}
    for chunk in (examples[:2], examples[2:]):  # the slow way: one backward per batch
        model.zero_grad()
        answer_loss(model, collator([(0, e) for e in chunk]), True).backward()
        for n, p in model.named_trainable_parameters():
            by_hand[n] += p.grad.pow(2) * len(chunk) / len(examples)
    fisher = diagonal_fisher(model, collator, 0, examples, 2)
    for n in by_hand:
        torch.testing.assert_close(fisher[n], by_hand[n])
    method.after_task(model, 0, examples, collator)
    method.after_task(model, 1, examples, collator)  # each task's Fisher on its own seeded sample, summed
    drawn = [random.Random(f"ewc:0:{t}").sample(examples, 4) for t in (0, 1)]
    parts = [diagonal_fisher(model, collator, t, drawn[t], 2) for t in (0, 1)]
    for n in by_hand:
        torch.testing.assert_close(method.fisher[n], parts[0][n] + parts[1][n])


# -- LwF ---------------------------------------------------------------------------------------


def test_lwf_distillation_is_t_squared_kl_on_the_masked_positions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=g), torch.randn(2, 3, 5, generator=g)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    t = 2.0
    by_hand = []
    for b, i in mask.nonzero().tolist():
        p = F.softmax(teacher[b, i] / t, -1)
        q = F.softmax(student[b, i] / t, -1)
        by_hand.append(float((p * (p.log() - q.log())).sum()) * t * t)
    assert float(distillation(student, teacher, mask, t)) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    assert float(distillation(teacher, teacher, mask, t)) == pytest.approx(0.0, abs=1e-6)


def test_lwf_teacher_is_the_model_before_the_task_and_its_term_enters_the_loss():
    method = LwFMethod(_config("lwf", lambda_lwf=0.7, lwf_temperature=2.0))
    model = method.wrap(build_tiny("llama")).train()
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.normal_(0, 0.1)
    batch = _batch(1)
    method.before_task(model, 0, [], None)
    lm = answer_loss(model, batch, True)
    assert float(method.loss(model, batch, lm).detach()) == float(lm.detach())  # no teacher on the first task
    method.before_task(model, 1, [], None)
    lm = answer_loss(model, batch, True)
    assert float(method.loss(model, batch, lm)) == pytest.approx(float(lm), abs=1e-6)  # teacher == student
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.add_(0.05)  # the student moves away from the teacher
    lm = answer_loss(model, batch, True)
    student = method._student_logits
    total = method.loss(model, batch, lm)
    with torch.no_grad():
        teacher = torch.func.functional_call(
            model, method.teacher, args=(), kwargs={"input_ids": batch["input_ids"]}, strict=False
        ).logits
    keep = student.shape[1]
    mask = batch["labels"][:, -keep + 1 :] != -100
    expected = lm + 0.7 * distillation(student[:, :-1], teacher[:, -keep:-1], mask, 2.0)
    assert float(total) == pytest.approx(float(expected), rel=1e-5) and float(total) > float(lm) + 1e-4


# -- A-GEM -------------------------------------------------------------------------------------


def test_agem_projects_only_a_conflicting_gradient_onto_the_reference_s_normal_plane():
    g, r = [torch.tensor([1.0, 0.0]), torch.tensor([2.0])], [torch.tensor([-1.0, 1.0]), torch.tensor([0.0])]
    assert project(g, r)  # g . r = -1 < 0; |r|^2 = 2
    torch.testing.assert_close(g[0], torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(g[1], torch.tensor([2.0]))
    assert sum(float((a * b).sum()) for a, b in zip(g, r, strict=True)) == pytest.approx(0.0)
    kept = [torch.tensor([1.0, 1.0])]
    assert not project(kept, [torch.tensor([1.0, 0.0])])
    torch.testing.assert_close(kept[0], torch.tensor([1.0, 1.0]))


def test_agem_step_never_raises_the_memory_loss_to_first_order():
    method = AGEMMethod(_config("agem", micro_batch_size=2, agem_memory=4))
    model = method.wrap(build_tiny("llama")).train()
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.normal_(0, 0.1)
    collator = Collator(_Tokens(), 16, 4)
    method.before_task(model, 0, _examples(4), collator)
    method.after_task(model, 0, _examples(4), collator)
    assert len(method.memory) == 4
    method.before_task(model, 1, _examples(4, 1), collator)
    params = method.trainable_parameters(model)
    for seed in range(6):  # some steps conflict with the memory, some do not
        model.zero_grad()
        answer_loss(model, collator([(1, e) for e in _examples(2, 10 + seed)]), True).backward()
        method.before_step(model)
        rng_batch = random.Random(f"agem-batch:0:{method.steps}")
        memory = collator(rng_batch.sample(method.memory, 2))
        reference = torch.autograd.grad(answer_loss(model, memory, True), params)
        dot = sum(float((p.grad * r).sum()) for p, r in zip(params, reference, strict=True))
        assert dot >= -1e-6 * sum(float(r.pow(2).sum()) for r in reference)


# -- LoRAMoE ------------------------------------------------------------------------------------


def test_loramoe_layer_is_the_gated_sum_of_its_experts():
    torch.manual_seed(0)
    layer = LoRAMixtureLinear(torch.nn.Linear(6, 5), rank=2, alpha=4.0, experts=3)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 4, 6)
    gate = F.softmax(x @ layer.router.T, -1)
    expected = layer.base_layer(x)
    for e in range(3):
        a, b = layer.lora_A[2 * e : 2 * e + 2], layer.lora_B[:, 2 * e : 2 * e + 2]
        expected = expected + gate[..., e : e + 1] * 2.0 * (x @ a.T @ b.T)  # scale alpha / rank = 2
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)


def test_localized_balance_by_hand():
    # 4 experts: 0-1 belong to kind 0 (replay), 2-3 to kind 1 (current task); delta 0.1.
    gate = torch.tensor([[[0.1, 0.2, 0.3, 0.4]], [[0.4, 0.3, 0.2, 0.1]], [[0.25, 0.25, 0.25, 0.25]]])
    kinds = torch.tensor([0, 1, 1])
    mask = torch.ones(3, 1)
    q0 = [0.1, 0.2, 0.3, 0.4]
    q1 = [0.65, 0.55, 0.45, 0.35]
    z = [q0[e] * (1.1 if e < 2 else 0.9) for e in range(4)] + [q1[e] * (0.9 if e < 2 else 1.1) for e in range(4)]
    mean = sum(z) / 8
    var = sum((v - mean) ** 2 for v in z) / 8
    assert float(localized_balance(gate, kinds, mask, 0.1)) == pytest.approx(var / mean, rel=1e-5)


def test_loramoe_saves_and_loads_to_the_same_outputs():
    model = LoRAMoEModel(build_tiny("llama"), LoRAMoEConfig(rank=2, alpha=4.0, experts=2))
    model.add_task()
    with torch.no_grad():
        for _, p in model.named_trainable_parameters():
            p.normal_(0, 0.1)
    assert len(model.mixtures()) == 7 * 4
    ids = random_tokens(2, 7)
    expected = model(input_ids=ids).logits
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        again = LoRAMoEModel.from_pretrained(build_tiny("llama"), folder)
        assert json.loads((Path(folder) / "moecl_adapter.json").read_text())["format"] == "moecl.loramoe"
    assert again.num_tasks == 1
    torch.testing.assert_close(again(input_ids=ids).logits, expected)


# -- through the template --------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ewc", "lwf", "agem", "loramoe"])
def test_each_runs_and_resumes_mid_task_to_the_same_numbers(tmp_path, monkeypatch, method):
    options = dict(method=method, save_every=1, replay=0.5, train_size=12)
    straight, _ = tiny_run(tmp_path, monkeypatch, "straight", **options)
    cls = METHODS[method]
    real, calls = cls.loss, []

    def stop(self, model, batch, lm_loss):
        calls.append(1)
        if len(calls) == 5:  # inside task 2, after a mid-task checkpoint
            raise KeyboardInterrupt
        return real(self, model, batch, lm_loss)

    monkeypatch.setattr(cls, "loss", stop)
    with pytest.raises(KeyboardInterrupt):
        tiny_run(tmp_path, monkeypatch, "cut", **options)
    monkeypatch.setattr(cls, "loss", real)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["partial"] is not None
    resumed, out = tiny_run(tmp_path, monkeypatch, "cut", **options)
    assert resumed["R"] == straight["R"] and resumed["method"] == method
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    straight_losses = [
        json.loads(line)["loss"] for line in (tmp_path / "straight" / "log.jsonl").read_text().splitlines()
    ]
    assert losses == straight_losses and all(math.isfinite(v) for v in losses)
