"""The CPU backend's last block (moecl.backends.cpu.last_block): the converted block computes
what transformers' own does."""

import copy
import inspect

import pytest
import torch
from conftest import VOCAB, build_tiny, random_tokens
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from moecl.backends.cpu import PIECES, last_block
from moecl.backends.cpu import apply as apply_cpu
from moecl.backends.cpu.last_block import LastColumnsBlock, transformers_tested

MIRRORED = "cache" in inspect.signature(LlamaDecoderLayer.forward).parameters
"""Whether this transformers' Llama block is the one LastColumnsBlock mirrors (5.0 keeps its own)."""
needs_mirrored = pytest.mark.skipif(not MIRRORED, reason="this transformers' Llama block keeps its own forward")


def pruned_last_block(model) -> int:
    return last_block.convert(model).changes.get("last_block", 0)


def test_the_backend_converts_a_llama_undoes_it_and_leaves_gpt2s_blocks_alone():
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    applied = apply_cpu(model, PIECES)
    assert applied.changes == {"linear": 4 * 7 + 1, **({"last_block": 1} if MIRRORED else {})}
    assert apply_cpu(model, PIECES).changes == {"linear": 0}  # a second call finds it done
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
    assert apply_cpu(gpt2, PIECES).changes == {"linear": 1}  # its head; GPT-2 projects with Conv1D
    assert pruned_last_block(gpt2) == 0


def test_the_last_block_is_used_only_with_the_transformers_versions_it_mirrors(monkeypatch):
    assert transformers_tested("5.0.0") and transformers_tested("5.25.1")
    assert not transformers_tested("4.57.0") and not transformers_tested("5.26.0") and not transformers_tested("6.0")
    monkeypatch.setattr(last_block, "transformers_tested", lambda version=None: False)
    model = build_tiny("llama")
    assert pruned_last_block(model) == 0 and type(model.model.layers[-1]) is not LastColumnsBlock


@needs_mirrored
@pytest.mark.parametrize("padding", [True, False])  # without padding transformers passes no mask at all
def test_pruned_last_block_gives_the_whole_blocks_logits_gradients_and_generations(padding):
    model = build_tiny("llama")
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


@needs_mirrored
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


@needs_mirrored
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
