"""use_fast_kernels (moecl.models.kernels): the converted layers compute what the originals do."""

import copy
import importlib
import json

import pytest
import torch
import transformers.models.llama.modeling_llama as llama
from conftest import VOCAB, build_tiny, random_tokens

from moecl.models.kernels import (
    GQA_ATTENTION,
    ROTARY_ORIGINALS,
    LastColumnsBlock,
    fused_rotary,
    grouped_attention,
    pruned_last_block,
    rotary_pos_emb,
    use_fast_kernels,
)


@pytest.mark.parametrize("length", [12, 100])  # SDPA with grouped heads; batched products in 2 blocks
def test_grouped_attention_gives_sdpas_logits_gradients_and_generations(length):
    model = build_tiny("llama")  # 4 query heads on 2 key/value heads
    reference = copy.deepcopy(model)
    assert grouped_attention(model) == 1 and model.config._attn_implementation == GQA_ATTENTION
    ids = random_tokens(3, length)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: the case that takes the grouped kernel
    mask[1, :1] = 0
    grads = []
    for m in (model, reference):
        m.train()
        logits = m(input_ids=ids, attention_mask=mask).logits
        grads.append(
            torch.autograd.grad((logits * torch.linspace(-1, 1, logits.shape[-1])).sum(), list(m.parameters()))
        )
        m.eval()
    for g, r in zip(*grads, strict=True):  # key/value gradients summed over a group in another order
        # float32 rounding: at 100 tokens both paths lie ~1e-4 from float64 (gradients up to ~250)
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5 if length < 64 else 5e-5)
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids, attention_mask=mask).logits,
            reference(input_ids=ids, attention_mask=mask).logits,
            rtol=1e-5,
            atol=1e-6,
        )
        new = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(new, reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))


def test_the_attention_name_stays_out_of_a_saved_config(tmp_path):
    model = build_tiny("llama")
    use_fast_kernels(model)
    model.save_pretrained(tmp_path)
    assert GQA_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_use_fast_kernels_converts_a_llama_and_leaves_gpt2_attention_alone():
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    counts = use_fast_kernels(model)
    assert counts == {"linear": 4 * 7 + 1, "attention": 1, "rotary": 1, "last_block": 1}
    ids = random_tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    gpt2 = build_tiny("gpt2")
    assert use_fast_kernels(gpt2)["attention"] == 0 and gpt2.config._attn_implementation == "sdpa"
    assert pruned_last_block(gpt2) == 0
    assert fused_rotary(gpt2) == 0  # no rotary embedding there


@pytest.mark.parametrize("tables", ["constant", "trainable"])
@pytest.mark.parametrize("layout", ["contiguous", "transposed"])
def test_fused_rotary_equals_transformers_formula_and_its_autograd_gradient(layout, tables):
    g = torch.Generator().manual_seed(0)
    if layout == "contiguous":
        q, k = torch.randn(2, 4, 7, 16, generator=g), torch.randn(2, 2, 7, 16, generator=g)
    else:  # as Llama's attention hands them over: (batch, seq, heads, dim) viewed as (batch, heads, seq, dim)
        q = torch.randn(2, 7, 4, 16, generator=g).transpose(1, 2)
        k = torch.randn(2, 7, 2, 16, generator=g).transpose(1, 2)
    q.requires_grad_(True)
    k.requires_grad_(True)
    cos, sin = torch.randn(2, 7, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    wrt = (q, k)
    if tables == "trainable":  # never so in transformers, but then cos and sin get their gradients too
        wrt = (q, k, cos.requires_grad_(True), sin.requires_grad_(True))

    def reference(x: torch.Tensor) -> torch.Tensor:  # transformers' formula; autograd takes its gradient
        return x * cos.unsqueeze(1) + llama.rotate_half(x) * sin.unsqueeze(1)

    fused = rotary_pos_emb(q, k, cos, sin)
    expected = (reference(q), reference(k))
    weights = [torch.randn(t.shape, generator=g) for t in expected]
    for f, e in zip(fused, expected, strict=True):
        torch.testing.assert_close(f, e, rtol=1e-6, atol=1e-6)
    got = torch.autograd.grad(sum((f * w).sum() for f, w in zip(fused, weights, strict=True)), wrt)
    want = torch.autograd.grad(sum((e * w).sum() for e, w in zip(expected, weights, strict=True)), wrt)
    assert len(got) == len(wrt)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_fused_rotary_gives_a_llama_the_logits_and_gradients_of_transformers_own():
    model = build_tiny("llama")
    assert fused_rotary(model) == 1 and fused_rotary(model) == 1  # a second call finds it in place
    module = importlib.import_module(type(model).__module__)
    ids = random_tokens(2, 9)
    weights = torch.linspace(-1, 1, model.config.vocab_size)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        logits = model(input_ids=ids).logits
        return logits.detach(), torch.autograd.grad((logits * weights).sum(), list(model.parameters()))

    fused = run()
    module.apply_rotary_pos_emb = ROTARY_ORIGINALS[module.__name__]
    try:
        original = run()
    finally:
        assert fused_rotary(model) == 1
    torch.testing.assert_close(fused[0], original[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(fused[1], original[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(("heads", "length"), [((4, 2), 11), ((6, 2), 100), ((3, 1), 150)])
def test_batched_attention_equals_sdpa_forward_and_backward_padding_rows_included(heads, length):
    """_BatchedAttention against SDPA's own kernel, in one block and in two and three blocks of
    queries: left-padded causal masks, query rows that see nothing (SDPA gives them 0 and no
    gradient), an output gradient on every row."""
    import torch.nn.functional as F

    from moecl.models.kernels import _BatchedAttention, _query_blocks

    torch.manual_seed(0)
    (h, kv), b, s, d = heads, 3, length, 8
    assert len(_query_blocks(s)) == {11: 1, 100: 2, 150: 3}[s]
    pad = torch.tensor([0, 4, s - 1])  # the last sequence has one real token
    keys = torch.arange(s)[None, :] >= pad[:, None]
    mask = (torch.ones(s, s, dtype=torch.bool).tril()[None] & keys[:, None, :])[:, None]  # (b, 1, s, s)
    q = torch.randn(b, s, h, d).transpose(1, 2).requires_grad_()  # the strided layout Llama passes
    k, v = torch.randn(b, kv, s, d, requires_grad=True), torch.randn(b, kv, s, d, requires_grad=True)
    grad = torch.randn(b, h, s, d)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = _BatchedAttention.apply(q, k, v, mask, d**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    assert torch.all(out[2, :, : s - 1] == 0)  # fully masked rows
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad), torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)


def test_batched_attention_only_where_it_computes_what_sdpa_does():
    from moecl.models.kernels import BATCHED_ATTENTION_LENGTHS, batched_attention_applies

    def applies(s, grad=True, dtype=torch.float32, dropout=0.0, mask=None):
        q = torch.zeros(2, 4, s, 8, dtype=dtype, requires_grad=grad)
        k = torch.zeros(2, 2, s, 8, dtype=dtype)
        mask = torch.ones(s, s, dtype=torch.bool).tril().expand(2, 1, s, s) if mask is None else mask
        return batched_attention_applies(q, k, mask, dropout)

    low, high = BATCHED_ATTENTION_LENGTHS
    assert applies(low) and applies(high)
    assert not applies(low - 1) and not applies(high + 1)  # SDPA is faster there
    assert not applies(100, grad=False)  # evaluation: nothing to differentiate
    assert not applies(100, dtype=torch.bfloat16)
    assert not applies(100, dropout=0.1)
    assert not applies(100, mask=torch.ones(2, 1, 100, 100))  # an additive mask
    assert not applies(100, mask=torch.ones(2, 1, 100, 100, dtype=torch.bool))  # not causal: blocks would skip keys
    with torch.no_grad():
        assert not applies(100)


@pytest.mark.parametrize("attention", ["sdpa", GQA_ATTENTION])
@pytest.mark.parametrize("padding", [True, False])  # without padding transformers passes no mask at all
def test_pruned_last_block_gives_the_whole_blocks_logits_gradients_and_generations(attention, padding):
    model = build_tiny("llama")
    if attention == GQA_ATTENTION:
        grouped_attention(model)
    reference = copy.deepcopy(model)
    assert pruned_last_block(model) == 1 and type(model.model.layers[-1]) is LastColumnsBlock
    widths = []
    model.model.layers[-1].mlp.register_forward_pre_hook(lambda module, args: widths.append(args[0].shape[1]))
    ids = random_tokens(3, 12)
    mask = torch.ones_like(ids)
    if padding:
        mask[0, :5] = 0
        mask[1, :1] = 0
    for keep in (1, 4):
        grads, outputs = [], []
        for m in (model, reference):
            m.train()
            logits = m(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            outputs.append(logits)
            weights = torch.linspace(-1, 1, logits.shape[-1])
            grads.append(torch.autograd.grad((logits * weights).sum(), list(m.parameters()), allow_unused=True))
            m.eval()
        assert outputs[0].shape == (3, keep, VOCAB)
        torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)
        for g, r in zip(*grads, strict=True):
            torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
        assert widths[-1] == keep  # the MLP saw the kept positions only
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits  # no logits_to_keep: the whole block
        assert widths[-1] == 12
        torch.testing.assert_close(full, reference(input_ids=ids, attention_mask=mask).logits, rtol=1e-5, atol=1e-6)
        new = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        assert torch.equal(new, reference.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False))
    assert model.model.layers[-1].columns is None


def test_pruned_last_block_computes_every_position_when_they_are_asked_for():
    """Hidden states requested, or a hook on the block (which may read its whole output): the
    block computes every position, and the outputs are the reference's."""
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    pruned_last_block(model)
    ids = random_tokens(2, 9)
    with torch.no_grad():
        out = model(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
        ref = reference(input_ids=ids, logits_to_keep=1, output_hidden_states=True)
        assert out.hidden_states[-1].shape == (2, 9, 32)
        torch.testing.assert_close(out.hidden_states[-1], ref.hidden_states[-1], rtol=1e-5, atol=1e-6)
        seen = []
        model.model.layers[-1].register_forward_hook(lambda module, args, output: seen.append(output.shape[1]))
        torch.testing.assert_close(
            model(input_ids=ids, logits_to_keep=1).logits, reference(input_ids=ids, logits_to_keep=1).logits
        )
        assert seen == [9]


def test_pruned_last_block_under_activation_checkpointing_gives_the_same_gradients():
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    pruned_last_block(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = random_tokens(3, 12)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    grads = []
    for m in (model, reference):
        m.train()
        logits = m(input_ids=ids, attention_mask=mask, logits_to_keep=3, use_cache=False).logits
        grads.append(torch.autograd.grad(logits.square().sum(), list(m.parameters()), allow_unused=True))
    for g, r in zip(*grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-6)
