"""Allocation matrices, entropy and diagonal mass on hand-made gates."""

import math

import pytest
import torch

from moecl.evaluation.routing import Allocation, diagonal_mass, gate_summary, own_expert_gates


def test_gate_summary_averages_real_tokens_and_their_entropy():
    probs = torch.tensor([[[1.0, 0.0], [0.5, 0.5], [0.2, 0.8]]])  # one example, three tokens
    mask = torch.tensor([[0, 1, 1]])  # the first token is padding
    means, entropy = gate_summary(probs, mask)
    torch.testing.assert_close(means, torch.tensor([[0.35, 0.65]]))
    h = [math.log(2), -(0.2 * math.log(0.2) + 0.8 * math.log(0.8))]
    assert float(entropy[0]) == pytest.approx(sum(h) / 2)


def test_allocation_matrix_rows_weigh_examples_equally_and_diagonal_mass():
    allocation = Allocation()
    # Task 0: two batches; each example's mean gate counts once whatever its length.
    a = gate_summary(torch.tensor([[[0.9, 0.1], [0.7, 0.3]]]), torch.tensor([[1, 1]]))  # mean 0.8 / 0.2
    b = gate_summary(torch.tensor([[[0.4, 0.6], [0.0, 1.0]]]), torch.tensor([[0, 1]]))  # 0.0 / 1.0
    allocation.add_task([a, b])
    allocation.add_task([gate_summary(torch.tensor([[[0.25, 0.75]]]), torch.tensor([[1]]))])
    record = allocation.to_json()
    assert record["matrix"] == [[0.4, 0.6], [0.25, 0.75]]
    assert record["diagonal_mass"] == pytest.approx((0.4 + 0.75) / 2)
    assert record["entropy"][1] == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), abs=1e-6)


def test_diagonal_mass_skips_tasks_without_an_expert():
    assert diagonal_mass([[0.6, 0.4], [0.3, 0.7], [0.5, 0.5]]) == pytest.approx(0.65)
    assert diagonal_mass([]) is None


def test_own_expert_gates_count_the_first_task_and_show_where_it_ends():
    phases = [[[1.0]], [[0.3, 0.7], [0.1, 0.9]], [[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.0, 0.1, 0.9]]]
    gates = own_expert_gates(phases)
    assert gates == {"after_own_task": [1.0, 0.9, 0.9], "at_end": [0.2, 0.6, 0.9]}
    assert own_expert_gates([]) == {"after_own_task": [], "at_end": []}
