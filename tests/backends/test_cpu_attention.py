"""The CPU backend's attention and last block (moecl.backends.cpu): the converted modules
compute what transformers' own do."""

import copy
import json

import pytest
import torch
from conftest import VOCAB, build_tiny, random_tokens

from moecl.backends.cpu import apply as apply_cpu
from moecl.backends.cpu import attention, last_block
from moecl.backends.cpu.attention import GQA_ATTENTION
from moecl.backends.cpu.last_block import LastColumnsBlock, transformers_tested


def grouped_attention(model) -> int:
    return attention.convert(model).changes.get("attention", 0)


def pruned_last_block(model) -> int:
    return last_block.convert(model).changes.get("last_block", 0)


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
    apply_cpu(model)
    model.save_pretrained(tmp_path)
    assert GQA_ATTENTION not in (tmp_path / "config.json").read_text()
    assert "attn_implementation" not in json.loads((tmp_path / "config.json").read_text())


def test_the_backend_converts_a_llama_undoes_it_and_leaves_gpt2_attention_alone():
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    applied = apply_cpu(model)
    assert applied.changes == {"linear": 4 * 7 + 1, "attention": 1, "last_block": 1}
    assert apply_cpu(model).changes == {"linear": 0}  # a second call finds it done
    ids = random_tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    applied.undo()
    assert [type(m) for m in model.modules()] == [type(m) for m in reference.modules()]
    assert model.config._attn_implementation == "sdpa"
    assert not model._forward_pre_hooks and not model._forward_hooks
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, reference(input_ids=ids).logits)
    gpt2 = build_tiny("gpt2")
    assert "attention" not in apply_cpu(gpt2).changes and gpt2.config._attn_implementation == "sdpa"
    assert pruned_last_block(gpt2) == 0


def test_the_last_block_is_used_only_with_the_transformers_versions_it_mirrors(monkeypatch):
    assert transformers_tested("5.0.0") and transformers_tested("5.25.1")
    assert not transformers_tested("4.57.0") and not transformers_tested("5.26.0") and not transformers_tested("6.0")
    monkeypatch.setattr(last_block, "transformers_tested", lambda version=None: False)
    model = build_tiny("llama")
    assert pruned_last_block(model) == 0 and type(model.model.layers[-1]) is not LastColumnsBlock


@pytest.mark.parametrize(("heads", "length"), [((4, 2), 11), ((6, 2), 100), ((3, 1), 150)])
def test_batched_attention_equals_sdpa_forward_and_backward_padding_rows_included(heads, length):
    """_BatchedAttention against SDPA's own kernel, in one block and in two and three blocks of
    queries: left-padded causal masks, query rows that see nothing (SDPA gives them 0 and no
    gradient), an output gradient on every row."""
    import torch.nn.functional as F

    from moecl.backends.cpu.attention import _BatchedAttention, _query_blocks

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
    from moecl.backends.cpu.attention import BATCHED_ATTENTION_LENGTHS, batched_attention_applies

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
