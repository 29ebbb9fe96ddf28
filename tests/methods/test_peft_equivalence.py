"""The LoRA baselines are the LoRA everyone runs: PEFT's, step for step.

seq-lora and per-task LoRA are built from PMoE's adapters (one LoRA implementation in moecl).
Here each is trained beside PEFT's ``LoraModel`` on the same tiny base, with the same rank,
alpha, targets and initial ``A``/``B``, through moecl's own training pieces (the method's
``wrap``/``before_task``/``after_task``, its parameter groups, the trainer's answer loss and
AdamW), against PEFT with Hugging Face's ``labels=`` loss and a plain AdamW: the logits, the
gradients and the weights after every step agree to float rounding, replay batches included.

Where moecl differs from a PEFT user's defaults on purpose, the test says so:
- ``all-linear``: moecl's spelling means every linear layer of the decoder blocks; PEFT's means
  every linear layer but the output head. The adapted layers are checked to be the same set.
- positions: moecl's model numbers left-padded rows from their first real token (as
  ``generate`` does); PEFT's forward is given those ``position_ids`` explicitly.
"""

from __future__ import annotations

import pytest
import torch

from moecl.adapters.expert_bank import LoRAExpertBank
from moecl.adapters.lora import LoRALinear
from moecl.config import RunConfig
from moecl.data.batches import answer_loss
from moecl.methods import METHODS
from moecl.training.trainer import fused_adamw
from tests.conftest import VOCAB, build_tiny

peft = pytest.importorskip("peft")

RANK, ALPHA, LR = 4, 8.0, 1e-2


def _batch(seed: int, rows: int = 3, width: int = 12) -> dict[str, torch.Tensor]:
    """Left-padded rows of random tokens; the last 2-4 real tokens of each row are its answer."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(rows, width, dtype=torch.long)
    mask = torch.zeros(rows, width, dtype=torch.long)
    labels = torch.full((rows, width), -100, dtype=torch.long)
    for row in range(rows):
        length = int(torch.randint(6, width + 1, (1,), generator=g))
        answer = int(torch.randint(2, 5, (1,), generator=g))
        ids[row, width - length :] = torch.randint(3, VOCAB, (length,), generator=g)
        mask[row, width - length :] = 1
        labels[row, width - answer :] = ids[row, width - answer :]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _with_replay(batch: dict[str, torch.Tensor], replay: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A current-task batch with an earlier task's examples mixed in (rows of both)."""
    return {k: torch.cat([batch[k], replay[k]]) for k in batch}


def _peft_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions).logits


def _peft_loss(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=positions,
        labels=batch["labels"],
    )
    return out.loss


def _peft_layer(theirs, name: str):
    return theirs.base_model.model.get_submodule(name.removeprefix("base_model."))


def _adapted(ours, kind: type) -> dict[str, torch.nn.Module]:
    return {name: m for name, m in ours.named_modules() if isinstance(m, kind)}


def _same_targets(ours, theirs, kind: type) -> None:
    from peft.tuners.lora import LoraLayer

    mine = {name.removeprefix("base_model.") for name in _adapted(ours, kind)}
    peft_names = {
        name.removeprefix("base_model.model.") for name, m in theirs.named_modules() if isinstance(m, LoraLayer)
    }
    assert mine == peft_names and len(mine) == 7 * 4  # q, k, v, o, gate, up, down in each of 4 blocks


def _ours(method_name: str):
    config = RunConfig(method=method_name, model="tiny-random", rank=RANK, alpha=ALPHA, lr=LR)
    method = METHODS[method_name](config)
    return method, method.wrap(build_tiny("llama"))


def _theirs(adapter: str = "default"):
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules="all-linear")
    return peft.get_peft_model(build_tiny("llama"), config, adapter_name=adapter), config


def _train_side_by_side(method, ours, theirs, pairs, batches) -> None:
    """Train both on ``batches`` with a fresh AdamW each (as the trainer does per task), checking
    the loss, every trainable gradient and every updated weight after each step. ``pairs``:
    ``[(our tensor getter, PEFT parameter)]`` for the adapter being trained."""
    groups = method.parameter_groups(ours)
    ours_opt = torch.optim.AdamW(groups, lr=LR, weight_decay=0.0, fused=fused_adamw(groups))
    theirs_opt = torch.optim.AdamW([p for p in theirs.parameters() if p.requires_grad], lr=LR, weight_decay=0.0)
    assert sum(p.numel() for g in groups for p in g["params"]) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad
    )
    ours.train(), theirs.train()
    for batch in batches:
        ours_loss = method.loss(ours, batch, answer_loss(ours, batch, True))
        theirs_loss = _peft_loss(theirs, batch)
        torch.testing.assert_close(ours_loss, theirs_loss, rtol=1e-5, atol=1e-6)
        ours_loss.backward(), theirs_loss.backward()
        for mine, reference in pairs:
            torch.testing.assert_close(mine().grad, reference.grad, rtol=1e-4, atol=1e-7)
        ours_opt.step(), theirs_opt.step()
        ours_opt.zero_grad(), theirs_opt.zero_grad()
        for mine, reference in pairs:  # AdamW divides by sqrt(v): an entry whose gradient is ~0
            # carries float32's summation noise into its step (2e-6 seen on an AMD EPYC); a step is LR
            torch.testing.assert_close(mine().detach(), reference.detach(), rtol=1e-4, atol=1e-3 * LR)


def test_seq_lora_trains_as_peft_lora_step_for_step_replay_included():
    method, ours = _ours("seq-lora")
    theirs, _ = _theirs()
    _same_targets(ours, theirs, LoRALinear)
    pairs = []
    with torch.no_grad():
        for name, module in _adapted(ours, LoRALinear).items():
            layer = _peft_layer(theirs, name)
            layer.lora_A["default"].weight.copy_(module.lora_A)  # moecl's own init: Kaiming A, zero B
            layer.lora_B["default"].weight.copy_(module.lora_B)
            assert layer.scaling["default"] == module.scaling == ALPHA / RANK
            pairs += [(lambda m=module: m.lora_A, layer.lora_A["default"].weight)]
            pairs += [(lambda m=module: m.lora_B, layer.lora_B["default"].weight)]
    probe = _batch(99)
    torch.testing.assert_close(
        ours(**{k: probe[k] for k in ("input_ids", "attention_mask")}).logits, _peft_logits(theirs, probe)
    )
    first = [_batch(seed) for seed in range(3)]
    second = [_with_replay(_batch(10 + seed), first[seed]) for seed in range(3)]  # task 2 with task 1's replay
    method.before_task(ours, 0, [], None)
    _train_side_by_side(method, ours, theirs, pairs, first)
    method.after_task(ours, 0, [], None)
    method.before_task(ours, 1, [], None)
    _train_side_by_side(method, ours, theirs, pairs, second)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        torch.testing.assert_close(
            ours(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
            _peft_logits(theirs, probe),
            rtol=1e-4,
            atol=1e-5,
        )
    # B moved: the checks compared trained adapters
    assert any(float(p.detach().abs().max()) > 0 for _, p in pairs[1::2])


def test_per_task_lora_is_one_peft_adapter_per_task_chosen_by_the_task_id():
    method, ours = _ours("per-task-lora")
    theirs, config = _theirs("task0")
    _same_targets(ours, theirs, LoRAExpertBank)
    banks = _adapted(ours, LoRAExpertBank)
    probe = _batch(99)
    for task in range(2):
        adapter = f"task{task}"
        if task:
            theirs.add_adapter(adapter, config)
            theirs.set_adapter(adapter)  # only this adapter trains, as only the new expert does here
        method.before_task(ours, task, [], None)  # opens expert `task` in every bank
        pairs = []
        with torch.no_grad():
            for name, bank in banks.items():
                layer = _peft_layer(theirs, name)
                layer.lora_A[adapter].weight.copy_(bank.expert_A)
                layer.lora_B[adapter].weight.copy_(bank.expert_B)
                pairs += [(lambda b=bank: b.expert_A, layer.lora_A[adapter].weight)]
                pairs += [(lambda b=bank: b.expert_B, layer.lora_B[adapter].weight)]
        batches = [_batch(20 * task + seed) for seed in range(3)]
        if task:
            batches = [_with_replay(b, _batch(seed)) for seed, b in enumerate(batches)]
        _train_side_by_side(method, ours, theirs, pairs, batches)
        method.after_task(ours, task, [], None)
    ours.eval(), theirs.eval()
    with torch.no_grad():
        for task in range(2):
            method.before_eval(ours, task)
            theirs.set_adapter(f"task{task}")
            torch.testing.assert_close(
                ours(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits,
                _peft_logits(theirs, probe),
                rtol=1e-4,
                atol=1e-5,
            )
