import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from moecl.adapters import GateState, LoRAExpertBank, LoRALinear, Router
from moecl.backends.cpu.adapters import FusedExpertBank


def _bank(num_experts: int, base: nn.Module, rank: int = 3, kind: type = LoRAExpertBank) -> LoRAExpertBank:
    bank = kind(base, rank=rank, alpha=6.0, gate=GateState())
    g = torch.Generator().manual_seed(0)
    for _ in range(num_experts):
        bank.add_expert()
        with torch.no_grad():  # non-zero B, else every expert's output is zero and the test is void
            bank.expert_B.copy_(torch.randn(bank.expert_B.shape, generator=g, dtype=torch.float64))
    return bank


@pytest.mark.parametrize("num_experts", [1, 3, 8])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_fused_mixture_equals_reference_loop(num_experts, kind):
    torch.manual_seed(0)
    base = nn.Linear(12, 10).double() if kind == "linear" else Conv1D(10, 12).double()
    bank = _bank(num_experts, base)
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(2, 5, num_experts, dtype=torch.float64, requires_grad=True)
    fused = bank.delta(x, logits.softmax(-1))
    ref = bank.reference_delta(x, logits.softmax(-1))
    torch.testing.assert_close(fused, ref, rtol=1e-12, atol=1e-12)

    w = torch.randn_like(fused)
    inputs = (x, logits, bank.expert_A, bank.expert_B)
    g_fused = torch.autograd.grad((fused * w).sum(), inputs)
    g_ref = torch.autograd.grad((ref * w).sum(), inputs)
    for a, b in zip(g_fused, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bank_forward_reads_the_shared_gate_and_adds_to_base():
    base = nn.Linear(8, 6).double()
    bank = _bank(2, base)
    x = torch.randn(3, 4, 8, dtype=torch.float64)
    bank.gate.probs = torch.rand(3, 4, 2, dtype=torch.float64).softmax(-1)
    torch.testing.assert_close(bank(x), base(x) + bank.reference_delta(x, bank.gate.probs))


@pytest.mark.parametrize("gate", ["per-token", "fixed"])
@pytest.mark.parametrize("bias", [False, True])
def test_fused_bank_layer_equals_base_plus_mixture_forward_and_backward(gate, bias):
    """The bank's fused layer (mixture accumulated into the base product) against ``base(x) +
    delta(x)`` computed apart, with frozen experts before the training one."""
    torch.manual_seed(0)
    bank = _bank(3, nn.Linear(12, 10, bias=bias).double().requires_grad_(False), kind=FusedExpertBank)
    with torch.no_grad():  # non-zero frozen experts too
        bank.frozen_B.normal_()
    x = torch.randn(2, 5, 12, dtype=torch.float64, requires_grad=True)
    shape = (2, 5, 3) if gate == "per-token" else (1, 1, 3)
    logits = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    bank.gate.probs = logits.softmax(-1)
    assert bank.fusable(x)
    fused, apart = bank(x), bank.reference_forward(x, bank.gate.probs)
    torch.testing.assert_close(fused, apart, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(fused)
    inputs = (x, logits, bank.expert_A, bank.expert_B)
    g_fused = torch.autograd.grad((fused * w).sum(), inputs, retain_graph=True)
    g_apart = torch.autograd.grad((apart * w).sum(), inputs)
    for a, b in zip(g_fused, g_apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with torch.no_grad():
        torch.testing.assert_close(bank(x), apart, rtol=1e-12, atol=1e-12)


def test_bank_layer_is_fused_only_where_it_computes_the_same():
    x = torch.randn(2, 3, 8)
    assert _bank(1, nn.Linear(8, 6).requires_grad_(False), kind=FusedExpertBank).fusable(x)
    assert not _bank(1, nn.Linear(8, 6), kind=FusedExpertBank).fusable(x)  # a trainable base needs its weight gradient
    assert not _bank(1, Conv1D(6, 8).requires_grad_(False), kind=FusedExpertBank).fusable(x)
    assert not _bank(1, nn.Linear(8, 6).requires_grad_(False), kind=FusedExpertBank).fusable(x.double())
    dropout = FusedExpertBank(nn.Linear(8, 6).requires_grad_(False), rank=2, alpha=4.0, gate=GateState(), dropout=0.1)
    dropout.add_expert()
    assert not dropout.fusable(x)


def test_bank_without_a_gate_in_flight_says_how_to_call_it():
    bank = _bank(2, nn.Linear(8, 6))
    with pytest.raises(RuntimeError, match="call the PMoEModel"):
        bank(torch.randn(1, 3, 8))


def test_add_expert_freezes_the_previous_one_into_buffers():
    bank = _bank(1, nn.Linear(8, 6).double())
    first_a, first_b = bank.expert_A.detach().clone(), bank.expert_B.detach().clone()
    bank.add_expert()
    assert bank.num_experts == 2
    assert [n for n, _ in bank.named_parameters(recurse=False)] == ["expert_A", "expert_B"]
    assert torch.equal(bank.frozen_A, first_a) and torch.equal(bank.frozen_B, first_b)
    assert torch.count_nonzero(bank.expert_B) == 0


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_lora_starts_as_identity_and_matches_explicit_formula(kind):
    torch.manual_seed(0)
    base = nn.Linear(8, 6).double() if kind == "linear" else Conv1D(6, 8).double()
    lora = LoRALinear(base, rank=2, alpha=4.0)
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    assert torch.equal(lora(x), base(x))
    with torch.no_grad():
        lora.lora_B.normal_()
    expected = base(x) + 2.0 * x @ lora.lora_A.T @ lora.lora_B.T
    torch.testing.assert_close(lora(x), expected)


def test_lora_returns_base_dtype_and_trains_in_float32():
    base = nn.Linear(8, 6).to(torch.bfloat16)
    lora = LoRALinear(base, rank=2, alpha=4.0)
    assert lora.lora_A.dtype == torch.float32
    assert lora(torch.randn(1, 8, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_router_grows_by_one_zero_column_and_normalises():
    router = Router(16)
    router.add_expert()
    with torch.no_grad():
        router.weight.normal_()
    old = router.weight.detach().clone()
    router.add_expert()
    router.add_expert()
    assert router.weight.shape == (3, 16)
    assert torch.equal(router.weight[:1], old) and torch.count_nonzero(router.weight[1:]) == 0
    probs = router(torch.randn(2, 5, 16))
    assert probs.shape == (2, 5, 3)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 5))


def test_router_normalises_its_input_unless_told_not_to():
    h = torch.randn(2, 3, 16)
    normed = Router(16)
    plain = Router(16, normalize=False)
    for router in (normed, plain):
        router.add_expert()
        router.add_expert()
        with torch.no_grad():
            router.weight.copy_(torch.linspace(-1, 1, 32).reshape(2, 16))
    torch.testing.assert_close(normed(100 * h), normed(h))  # scale of h_tau does not saturate the gate
    torch.testing.assert_close(plain(h), torch.softmax(h @ plain.weight.T, -1))
    rms = h.pow(2).mean(-1, keepdim=True).add(1e-6).rsqrt()
    torch.testing.assert_close(normed(h), torch.softmax((h * rms) @ normed.weight.T, -1))
