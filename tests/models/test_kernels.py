"""use_fast_kernels (moecl.models.kernels): the converted layers compute what the originals do."""

import copy
import json

import torch
from conftest import build_tiny, random_tokens

from moecl.models.kernels import GQA_ATTENTION, grouped_attention, use_fast_kernels


def test_grouped_attention_gives_sdpas_logits_gradients_and_generations():
    model = build_tiny("llama")  # 4 query heads on 2 key/value heads
    reference = copy.deepcopy(model)
    assert grouped_attention(model) == 1 and model.config._attn_implementation == GQA_ATTENTION
    ids = random_tokens(3, 12)
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
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-5)
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
    assert counts == {"linear": 4 * 7 + 1, "attention": 1}
    ids = random_tokens(2, 9)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
    gpt2 = build_tiny("gpt2")
    assert use_fast_kernels(gpt2)["attention"] == 0 and gpt2.config._attn_implementation == "sdpa"
