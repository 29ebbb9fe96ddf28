"""The CPU backend's products (moecl.backends.cpu.linear, .adapters) against the stock modules."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import build_tiny, random_tokens
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from moecl import PMoEConfig, PMoEModel
from moecl.adapters.lora import LoRALinear as StockLoRA
from moecl.backends.cpu import apply as apply_cpu
from moecl.backends.cpu import linear as onednn
from moecl.backends.cpu import mkl
from moecl.backends.cpu.adapters import MergedLoRALinear
from moecl.backends.cpu.linear import OneDNNLinear, linear

pytestmark = pytest.mark.skipif(not onednn.ENABLED, reason="this PyTorch has no oneDNN")


@pytest.fixture(params=["onednn", "mkl"])
def route(request, monkeypatch):
    """Both kernels ``linear`` picks from: oneDNN, or MKL where unlock_mkl gave it its fast kernels."""
    monkeypatch.setattr(mkl, "_state", "unlocked" if request.param == "mkl" else "skipped: test")
    return request.param


@pytest.mark.parametrize("weight_grad", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("strided", [False, True])
def test_linear_values_and_gradients_equal_f_linear(weight_grad, bias, strided, route):
    torch.manual_seed(0)
    x = torch.randn(3, 37, 96, requires_grad=True)
    if strided:  # the rows a model keeps logits for: a view that is not contiguous
        x = x[:, -5:]
    w = torch.randn(160, 96, requires_grad=weight_grad)
    b = torch.randn(160, requires_grad=weight_grad) if bias else None
    g = torch.randn(*x.shape[:-1], 160)
    leaves = [t for t in (x, w, b) if t is not None and t.requires_grad]
    fast = torch.autograd.grad((linear(x, w, b) * g).sum(), leaves)
    slow = torch.autograd.grad((F.linear(x, w, b) * g).sum(), leaves)
    torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-4)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("shape", [(8, 16), (16, 8)])  # both ways of computing the weight gradient
def test_weight_gradient_of_low_rank_shapes(shape, route):
    out_features, in_features = shape
    x = torch.randn(50, in_features)
    w = torch.randn(out_features, in_features, requires_grad=True)
    g = torch.randn(50, out_features)
    (fast,) = torch.autograd.grad((linear(x, w) * g).sum(), [w])
    torch.testing.assert_close(fast, g.T @ x, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("weight_grad", [False, True])
def test_the_compilers_operator_equals_f_linear_and_passes_opcheck(weight_grad):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 12, requires_grad=True)
    w = torch.randn(7, 12, requires_grad=weight_grad)
    b = torch.randn(7, requires_grad=weight_grad)
    torch.library.opcheck(onednn.onednn_linear, (x, w, b))  # shape function and gradient registration
    g = torch.randn(2, 5, 7)
    leaves = [x, w, b] if weight_grad else [x]
    fast = torch.autograd.grad((onednn.onednn_linear(x, w, b) * g).sum(), leaves)
    slow = torch.autograd.grad((F.linear(x, w, b) * g).sum(), leaves)
    for f, s in zip(fast, slow, strict=True):
        torch.testing.assert_close(f, s, rtol=1e-5, atol=1e-4)


def test_other_dtypes_take_the_plain_path():
    x, w = torch.randn(4, 8, dtype=torch.bfloat16), torch.randn(6, 8, dtype=torch.bfloat16)
    assert torch.equal(linear(x, w), F.linear(x, w))
    onednn.ENABLED = False
    try:
        x32, w32 = x.float(), w.float()
        assert torch.equal(linear(x32, w32), F.linear(x32, w32))
    finally:
        onednn.ENABLED = True


def test_use_onednn_converts_in_place_keeping_tied_weights_and_state():
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    reference = copy.deepcopy(model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    count = onednn.convert(model).changes["linear"]
    assert count == sum(type(m) is nn.Linear for m in reference.modules()) > 0
    assert type(model.lm_head) is OneDNNLinear and model.lm_head.weight is model.model.embed_tokens.weight
    assert model.state_dict().keys() == reference.state_dict().keys()
    ids = random_tokens(2, 9)
    torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_pmoe_training_step_gradients_equal_the_plain_path(route):
    """Forward and backward of a PMoE model (shallow LoRA, expert banks, router) with every linear
    product on oneDNN give the gradients the plain F.linear path gives."""

    def grads(enabled: bool) -> dict[str, torch.Tensor]:
        onednn.ENABLED = enabled
        try:
            model = PMoEModel(build_tiny("llama"), PMoEConfig(tau=0.5, rank=2, alpha=4, target_modules=["all-linear"]))
            apply_cpu(model)
            model.add_task()
            model.add_task()
            with torch.no_grad():
                for p in model.trainable_parameters():
                    p.normal_(std=0.1)
            ids = random_tokens(3, 11)
            model(input_ids=ids, labels=ids).loss.backward()
            return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        finally:
            onednn.ENABLED = True

    fast, slow = grads(True), grads(False)
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in fast:
        torch.testing.assert_close(fast[name], slow[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("bias", [False, True])
def test_merged_lora_equals_base_plus_delta_forward_backward_and_in_evaluation(bias):
    """The backend's merged LoRA layer ``x (W + s B A)^T`` against ``base(x) + s B A x`` computed apart."""
    torch.manual_seed(0)
    layer = MergedLoRALinear(nn.Linear(48, 80, bias=bias).requires_grad_(False), rank=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_(std=0.5)
    assert layer.mergeable()
    x = torch.randn(2, 13, 48, requires_grad=True)
    g = torch.randn(2, 13, 80)
    params = [x, layer.lora_A, layer.lora_B]
    merged = torch.autograd.grad((layer(x) * g).sum(), params)
    apart = torch.autograd.grad((StockLoRA.forward(layer, x) * g).sum(), params)
    torch.testing.assert_close(layer(x), StockLoRA.forward(layer, x), rtol=1e-5, atol=1e-5)
    for m, a in zip(merged, apart, strict=True):  # float32 sums over 26 tokens in two orders: on
        # another CPU's kernels an entry near 0 differs by ~1e-5; a wrong scale or transpose by > 1e-2
        torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # evaluation keeps W + s B A, and builds it again once B changes
        torch.testing.assert_close(layer(x), StockLoRA.forward(layer, x), rtol=1e-5, atol=1e-5)
        layer.lora_B.add_(1.0)
        torch.testing.assert_close(layer(x), StockLoRA.forward(layer, x), rtol=1e-5, atol=1e-5)
    assert not MergedLoRALinear(nn.Linear(48, 80), rank=4, alpha=8, dropout=0.1).mergeable()


def test_merged_lora_of_a_frozen_adapter_passes_only_the_input_gradient():
    layer = MergedLoRALinear(nn.Linear(16, 24).requires_grad_(False), rank=2, alpha=4).requires_grad_(False)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 16, requires_grad=True)
    (grad,) = torch.autograd.grad(layer(x).sum(), [x])
    (expected,) = torch.autograd.grad(StockLoRA.forward(layer, x).sum(), [x])
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-5)
    assert layer.lora_A.grad is None and layer.lora_B.grad is None


def test_a_merged_lora_on_a_trainable_base_still_trains_the_base():
    """An unfrozen base layer gets its gradients: the merged form (which passes none to W and b)
    is not taken for it."""
    torch.manual_seed(0)
    layer = MergedLoRALinear(nn.Linear(16, 24), rank=2, alpha=4)
    stock = StockLoRA(copy.deepcopy(layer.base_layer), rank=2, alpha=4)
    stock.load_state_dict(layer.state_dict())
    x = torch.randn(5, 16)
    layer(x).square().sum().backward()
    stock(x).square().sum().backward()
    assert layer.base_layer.weight.grad is not None
    torch.testing.assert_close(layer.base_layer.weight.grad, stock.base_layer.weight.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(layer.base_layer.bias.grad, stock.base_layer.bias.grad, rtol=1e-5, atol=1e-5)


def test_the_merged_lora_keeps_no_merged_copy_for_its_backward():
    layer = MergedLoRALinear(nn.Linear(64, 96).requires_grad_(False), rank=4, alpha=8)
    x = torch.randn(3, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(x)
    weight = layer.base_layer.weight
    assert not any(t.shape == weight.shape and t.data_ptr() != weight.data_ptr() for t in saved)
