import math

import pytest
import torch

from moecl.data.batches import Collator
from moecl.data.trace import Example
from moecl.methods.pmoe import router_loss
from moecl.models.loading import byte_tokenizer
from moecl.training.replay import ReplayMemory


def test_replay_keeps_the_configured_share_of_each_past_task_only():
    memory = ReplayMemory(fraction=0.1, seed=0)
    tasks = {t: [Example(f"t{t} q{i}", "a") for i in range(n)] for t, n in enumerate([50, 7, 200])}
    memory.add_task(0, tasks[0])
    assert memory.tasks() == {0} and len(memory.items) == 5
    memory.add_task(1, tasks[1])
    assert len([1 for t, _ in memory.items if t == 1]) == math.ceil(0.7)  # at least one example
    assert all(e in tasks[t] for t, e in memory.items)
    again = ReplayMemory(0.1, 0)
    again.add_task(0, tasks[0])
    assert again.items == memory.items[:5]  # same seed, same sample
    assert ReplayMemory.from_json(memory.to_json(), 0.1, 0).items == memory.items
    empty = ReplayMemory(0.0)
    empty.add_task(0, tasks[0])
    assert empty.items == []


def test_router_loss_is_mean_token_nll_of_the_task_expert():
    probs = torch.tensor([[[0.5, 0.5], [0.25, 0.75], [0.9, 0.1]]])  # (1, 3, 2)
    mask = torch.tensor([[0, 1, 1]])  # first token is padding
    loss = router_loss(probs, torch.tensor([1]), mask)
    assert loss.item() == pytest.approx(-(math.log(0.75) + math.log(0.1)) / 2)


def test_collator_masks_prompt_and_padding_and_appends_eos():
    tok = byte_tokenizer()
    batch = Collator(tok, max_prompt_tokens=4, max_answer_tokens=2)(
        [(0, Example("abcdef", "xyz")), (1, Example("q", "r"))]
    )
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["attention_mask"]
    assert ids.shape == (2, 7)  # 4 prompt (left-truncated) + 2 answer + eos
    assert tok.decode(ids[0, :4]) == "cdef" and tok.decode(ids[0, 4:6]) == "xy" and ids[0, 6] == tok.eos_token_id
    assert labels[0, :4].eq(-100).all() and labels[0, 4:].tolist() == ids[0, 4:].tolist()
    assert mask[1].tolist() == [0, 0, 0, 0, 1, 1, 1] and labels[1, :5].eq(-100).all()
    assert batch["task_ids"].tolist() == [0, 1]


@pytest.mark.parametrize("keep", [True, False])
def test_answer_loss_equals_the_models_own_label_loss(keep):
    from moecl.data.batches import answer_loss
    from moecl.models.loading import tiny_random

    model, tok = tiny_random()
    batch = Collator(tok, 32, 8)([(0, Example("a long prompt here", "ans")), (0, Example("hi", "longer answer"))])
    expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
    torch.testing.assert_close(answer_loss(model, batch, keep), expected)


def test_length_grouped_batches_cover_every_example_once_per_epoch_with_less_padding():
    from moecl.data.batches import LengthGroupedBatches

    lengths = [int(x) for x in torch.randint(5, 300, (203,), generator=torch.Generator().manual_seed(1))]

    def epochs(window: int, seed: int = 0, count: int = 3) -> list[list[list[int]]]:
        sampler = LengthGroupedBatches(lengths, 8, torch.Generator().manual_seed(seed), window)
        return [list(sampler) for _ in range(count)]

    def padding(batches: list[list[int]]) -> float:
        real = sum(lengths[i] for b in batches for i in b)
        return 1 - real / sum(max(lengths[i] for i in b) * len(b) for b in batches)

    grouped, shuffled = epochs(8), epochs(1)
    for epoch in grouped + shuffled:
        assert sorted(i for b in epoch for i in b) == list(range(203))  # every example, once
        assert len(epoch) == len(LengthGroupedBatches(lengths, 8, torch.Generator(), 8)) == 26  # ceil(203 / 8)
        assert all(1 <= len(b) <= 8 for b in epoch)
    assert grouped[0] != grouped[1]  # a new order each epoch
    assert epochs(8) == grouped and epochs(8, seed=1) != grouped  # a pure function of the seed
    assert padding([b for e in grouped for b in e]) < 0.5 * padding([b for e in shuffled for b in e])


def test_fused_adamw_on_cpu_float32_gives_the_default_loops_update():
    from moecl.training.trainer import fused_adamw

    torch.manual_seed(0)
    params = [torch.randn(7, 5, requires_grad=True), torch.randn(3, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    start = [p.detach().clone() for p in params]
    assert fused_adamw([{"params": params}]) is True
    assert fused_adamw([{"params": [torch.zeros(2, dtype=torch.bfloat16)]}]) is None
    fused = torch.optim.AdamW(params, lr=0.1, weight_decay=0.01, fused=True)
    plain = torch.optim.AdamW(twins, lr=0.1, weight_decay=0.01)
    for _ in range(3):
        for group, optimizer in ((params, fused), (twins, plain)):
            sum((p**2).sum() for p in group).backward()
            optimizer.step()
            optimizer.zero_grad()
    for p, q, s in zip(params, twins, start, strict=True):
        assert (p - s).abs().max() > 0.1  # three steps of lr 0.1 moved it
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-6)
