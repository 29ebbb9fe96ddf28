import json

import pytest
import torch
from conftest import VOCAB, build_tiny, perturb_adapters, random_tokens
from transformers import LlamaConfig, LlamaModel, T5Config, T5ForConditionalGeneration

from moecl import PMoEConfig, PMoEModel
from moecl.adapters import LoRAExpertBank, LoRALinear


def _pmoe(family: str, experts: int = 0, tau=0.5, **kw) -> PMoEModel:
    pmoe = PMoEModel(build_tiny(family), PMoEConfig.paper(tau=tau, rank=2, alpha=4, **kw))
    for _ in range(experts):
        pmoe.add_task()
    return pmoe


def _left_padded_batch():
    """Three sequences of lengths 7, 4 and 2, left-padded with token 0."""
    lengths = [7, 4, 2]
    ids = random_tokens(3, 7)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : 7 - n] = 0
        mask[row, 7 - n :] = 1
    return ids, mask, lengths


def test_outputs_equal_base_model_at_init_and_after_add_task(family):
    base = build_tiny(family)
    pmoe = _pmoe(family)
    ids = random_tokens(2, 9)
    expected = base(input_ids=ids).logits
    assert torch.equal(pmoe(input_ids=ids).logits, expected)
    pmoe.add_task()
    pmoe.add_task()
    assert torch.equal(pmoe(input_ids=ids).logits, expected)


def test_surgery_places_shallow_lora_and_deep_banks(family):
    pmoe = _pmoe(family, tau=1)
    kinds = [type(m) for m in pmoe.modules() if isinstance(m, (LoRALinear, LoRAExpertBank))]
    per_block = len(pmoe.target_modules)
    assert kinds == [LoRALinear] * per_block + [LoRAExpertBank] * 3 * per_block


def test_tau_fraction_rounds_to_blocks():
    assert _pmoe("llama", tau=0.75).tau == 3
    assert _pmoe("llama", tau=0).tau == 0 and _pmoe("llama", tau=4).tau == 4


@pytest.mark.parametrize("tau", [0, 2, 4])
def test_router_probs_sum_to_one_and_ignore_batch_neighbours(family, tau):
    pmoe = _pmoe(family, experts=3, tau=tau)
    perturb_adapters(pmoe, scale=0.3)
    ids, mask, lengths = _left_padded_batch()
    batched = pmoe.router_probs(ids, mask)
    assert batched.shape == (3, 7, 3)
    torch.testing.assert_close(batched.sum(-1), torch.ones(3, 7))
    for row, n in enumerate(lengths):
        alone = pmoe.router_probs(ids[row : row + 1, 7 - n :], mask[row : row + 1, 7 - n :])
        torch.testing.assert_close(batched[row, 7 - n :], alone[0], rtol=1e-5, atol=1e-6)


def test_logits_of_left_padded_batch_equal_unpadded(family):
    pmoe = _pmoe(family, experts=2)
    perturb_adapters(pmoe, scale=0.3)
    ids, mask, lengths = _left_padded_batch()
    batched = pmoe(input_ids=ids, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        alone = pmoe(input_ids=ids[row : row + 1, 7 - n :]).logits
        torch.testing.assert_close(batched[row, 7 - n :], alone[0], rtol=1e-4, atol=1e-4)


def test_greedy_generate_with_cache_equals_stepwise_argmax(family):
    pmoe = _pmoe(family, experts=3)
    perturb_adapters(pmoe, scale=0.3)
    ids, mask, _ = _left_padded_batch()
    new = 6
    out = pmoe.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    seq, m, done = ids, mask, torch.zeros(3, dtype=torch.bool)
    for _ in range(new):
        logits = pmoe(input_ids=seq, attention_mask=m, use_cache=False).logits[:, -1]
        token = logits.argmax(-1).masked_fill(done, 0)  # finished rows are padded, as generate() does
        done |= token == 2
        seq = torch.cat([seq, token[:, None]], dim=1)
        m = torch.cat([m, torch.ones_like(m[:, :1])], dim=1)
        if done.all():
            break
    assert torch.equal(out, seq)


def _train_steps(pmoe: PMoEModel, steps: int = 4, seed: int = 0) -> None:
    opt = torch.optim.AdamW(pmoe.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    pmoe.train()
    for step in range(steps):
        ids = random_tokens(4, 10, seed=seed * 100 + step)
        pmoe(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    pmoe.eval()


def _trainable_names(pmoe: PMoEModel) -> set[str]:
    return {n for n, _ in pmoe.named_trainable_parameters()}


def test_trainable_parameters_are_shallow_lora_router_and_newest_expert(family):
    pmoe = _pmoe(family, experts=3)
    names = _trainable_names(pmoe)
    shallow = {f"{n}.{p}" for n, m in pmoe.named_modules() if isinstance(m, LoRALinear) for p in ("lora_A", "lora_B")}
    newest = {
        f"{n}.{p}" for n, m in pmoe.named_modules() if isinstance(m, LoRAExpertBank) for p in ("expert_A", "expert_B")
    }
    assert names == shallow | newest | {"router.weight"}
    assert {n for n, p in pmoe.named_parameters() if p.requires_grad} == names
    trainable, total = pmoe.parameter_counts()
    assert trainable == sum(p.numel() for p in pmoe.trainable_parameters()) and trainable < total


def test_earlier_experts_bit_identical_after_adamw_with_weight_decay(family):
    pmoe = _pmoe(family, experts=1)
    _train_steps(pmoe, seed=1)
    pmoe.add_task()
    frozen = {
        n: (b.frozen_A.clone(), b.frozen_B.clone()) for n, b in pmoe.named_modules() if isinstance(b, LoRAExpertBank)
    }
    before = {n: p.detach().clone() for n, p in pmoe.named_trainable_parameters()}
    _train_steps(pmoe, seed=2)
    for n, b in pmoe.named_modules():
        if isinstance(b, LoRAExpertBank):
            assert torch.equal(b.frozen_A, frozen[n][0]) and torch.equal(b.frozen_B, frozen[n][1])
            assert torch.count_nonzero(b.frozen_B) > 0  # the first task did train it
    after = dict(pmoe.named_trainable_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == set(before)  # shallow LoRA, router and new expert all moved


def test_gradient_checkpointing_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        pmoe = _pmoe("llama", experts=2)
        perturb_adapters(pmoe, scale=0.3)
        if checkpointing:
            pmoe.gradient_checkpointing_enable()
        pmoe.train()
        ids = random_tokens(2, 8)
        pmoe(input_ids=ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in pmoe.named_trainable_parameters()})
    assert grads[0].keys() == grads[1].keys()
    assert torch.count_nonzero(grads[1]["router.weight"]) > 0
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="use_reentrant"):
        pmoe.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})


def test_save_load_round_trip_gives_identical_logits_and_router_probs(family, tmp_path):
    pmoe = _pmoe(family, experts=3)
    perturb_adapters(pmoe)
    pmoe.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moecl_adapter.json", "moecl_adapter.safetensors"]
    loaded = PMoEModel.from_pretrained(build_tiny(family), tmp_path)
    assert loaded.num_experts == 3 and _trainable_names(loaded) == _trainable_names(pmoe)
    ids, mask, _ = _left_padded_batch()
    assert torch.equal(
        loaded(input_ids=ids, attention_mask=mask).logits, pmoe(input_ids=ids, attention_mask=mask).logits
    )
    assert torch.equal(loaded.router_probs(ids, mask), pmoe.router_probs(ids, mask))


def test_loading_onto_a_different_base_model_is_refused(tmp_path):
    pmoe = _pmoe("llama", experts=1)
    pmoe.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="num_blocks=4.*num_blocks=2"):
        PMoEModel.from_pretrained(build_tiny("llama", layers=2), tmp_path)
    with pytest.raises(ValueError, match="model_type='llama'"):
        PMoEModel.from_pretrained(build_tiny("qwen2"), tmp_path)
    meta = json.loads((tmp_path / "moecl_adapter.json").read_text())
    meta["num_experts"] = 2
    (tmp_path / "moecl_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="num_experts is 2, but .* holds the tensors of at most 1"):
        PMoEModel.from_pretrained(build_tiny("llama"), tmp_path)
    meta["num_experts"], meta["target_modules"] = 1, ["q_proj", "v_proj", "k_proj"]
    meta["pmoe"]["target_modules"] = meta["target_modules"]
    (tmp_path / "moecl_adapter.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match.*missing.*k_proj"):
        PMoEModel.from_pretrained(build_tiny("llama"), tmp_path)
    with pytest.raises(ValueError, match="not a saved PMoE"):
        PMoEModel.from_pretrained(build_tiny("llama"), tmp_path / "nowhere")


@pytest.mark.parametrize("tau", [5, -1, 1.5, True, 1.0, 0.0, "half"])
def test_tau_outside_range_or_ambiguous_is_refused(tau):
    with pytest.raises(ValueError, match="tau"):
        PMoEModel(build_tiny("llama"), PMoEConfig(tau=tau))


def test_tau_all_is_every_block_and_old_folders_saved_with_one_point_zero_still_load(tmp_path):
    pmoe = PMoEModel(build_tiny("llama"), PMoEConfig(tau="all", gate="sum"))
    assert pmoe.tau == pmoe.num_blocks == 4 and PMoEModel(build_tiny("llama"), PMoEConfig(tau=1)).tau == 1
    pmoe.add_task()
    pmoe.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "moecl_adapter.json").read_text())
    meta["pmoe"]["tau"] = 1.0  # how a folder written before the refusal said "every block"
    (tmp_path / "moecl_adapter.json").write_text(json.dumps(meta))
    assert PMoEModel.from_pretrained(build_tiny("llama"), tmp_path).tau == 4


def test_unknown_target_module_lists_the_ones_that_exist():
    with pytest.raises(ValueError, match=r"'qkv'.*gate_proj.*k_proj.*q_proj"):
        PMoEModel(build_tiny("llama"), PMoEConfig(target_modules=["qkv"]))


def test_user_target_modules_override_family_default():
    pmoe = PMoEModel(build_tiny("llama"), PMoEConfig(tau=2, target_modules=["q_proj", "mlp.down_proj"]))
    wrapped = {n.rsplit(".", 1)[1] for n, m in pmoe.named_modules() if isinstance(m, (LoRALinear, LoRAExpertBank))}
    assert wrapped == {"q_proj", "down_proj"}


def test_all_linear_adapts_every_linear_layer_of_the_blocks_and_saves_their_names(family, tmp_path):
    from moecl.config import RunConfig
    from moecl.models.adapter_model import _linear_paths
    from moecl.models.architectures import decoder_blocks

    paths = _linear_paths(decoder_blocks(build_tiny(family))[0])  # GPT-2 has c_proj twice: in attn and mlp
    leaves = {p.rpartition(".")[2] for p in paths}
    pmoe = PMoEModel(build_tiny(family), PMoEConfig(tau=2, target_modules=["all-linear"]))
    wrapped = {n for n, m in pmoe.named_modules() if isinstance(m, (LoRALinear, LoRAExpertBank))}
    assert set(pmoe.target_modules) == leaves == {n.rsplit(".", 1)[1] for n in wrapped}
    assert len(wrapped) == 4 * len(paths) > 4 * 2  # more than q and v in each of the 4 blocks
    pmoe.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "moecl_adapter.json").read_text())
    assert saved["target_modules"] == pmoe.target_modules != ["all-linear"]
    assert RunConfig().target_modules == ["all-linear"] and RunConfig(method="moses").target_modules is None


def test_non_decoder_models_are_refused():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=VOCAB, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8))
    with pytest.raises(ValueError, match="encoder-decoder"):
        PMoEModel(t5)
    headless = LlamaModel(
        LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="AutoModelForCausalLM"):
        PMoEModel(headless)
    with pytest.raises(ValueError, match="already carries"):
        PMoEModel(_pmoe("llama").base_model)


def test_shallow_lora_matches_peft_lora_with_the_same_weights():
    peft = pytest.importorskip("peft")
    ours = PMoEModel(build_tiny("llama"), PMoEConfig.paper(tau=4, rank=2, alpha=4))  # every block shallow
    perturb_adapters(ours)
    theirs = peft.get_peft_model(
        build_tiny("llama"), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():
        for name, module in ours.named_modules():
            if isinstance(module, LoRALinear):
                peft_layer = theirs.base_model.model.get_submodule(name.removeprefix("base_model."))
                peft_layer.lora_A["default"].weight.copy_(module.lora_A)
                peft_layer.lora_B["default"].weight.copy_(module.lora_B)
    ids = random_tokens(2, 9)
    torch.testing.assert_close(ours(input_ids=ids).logits, theirs(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_router_probs_runs_only_the_shallow_blocks_and_equals_a_full_pass(family):
    """router_probs ends the pass at the router: the deep blocks never run, the gate is the one a
    full forward sets, and the model forwards normally afterwards (the early exit is reset)."""
    pmoe = _pmoe(family, experts=2, tau=2)
    perturb_adapters(pmoe, scale=0.3)
    ids, mask, _ = _left_padded_batch()
    calls = []
    pmoe.blocks[-1].register_forward_hook(lambda *args: calls.append(1))
    probs = pmoe.router_probs(ids, mask)
    assert calls == []
    with torch.no_grad():
        logits = pmoe(input_ids=ids, attention_mask=mask).logits
    assert calls == [1] and logits.shape[:2] == ids.shape
    torch.testing.assert_close(pmoe.gate.probs, probs, rtol=0, atol=0)


@pytest.mark.skipif(
    "cache" not in __import__("inspect").signature(__import__("transformers").LlamaForCausalLM.forward).parameters,
    reason="this transformers' Llama block keeps its own forward (the backend mirrors a later 5.x block)",
)
@pytest.mark.parametrize("tau", [2, 4])  # the router after block 2, or after the last block itself
def test_pruned_last_block_gives_pmoe_the_same_answer_loss_and_gradients(tau):
    """With the last block computing only the answer's positions, its expert banks read those
    positions' gate: the loss and every trainable gradient (router included) are unchanged."""
    import copy

    from moecl.backends.cpu import last_block
    from moecl.data.batches import answer_loss

    base = build_tiny("llama")
    plain = copy.deepcopy(base)
    assert last_block.convert(base).changes == {"last_block": 1}
    models = [PMoEModel(b, PMoEConfig(tau=tau, rank=2, alpha=4)) for b in (base, plain)]
    for pmoe in models:
        pmoe.add_task()
        pmoe.add_task()
        perturb_adapters(pmoe, scale=0.3)
    ids, mask, _ = _left_padded_batch()
    labels = torch.full_like(ids, -100)
    labels[:, -2:] = ids[:, -2:]  # a two-token answer at the end of every row
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    losses, grads = [], []
    for pmoe in models:
        loss = answer_loss(pmoe, batch) + pmoe.gate.probs.square().mean()  # a loss on the gate too
        losses.append(loss)
        grads.append(torch.autograd.grad(loss, pmoe.trainable_parameters()))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=1e-7)
    for g, r in zip(*grads, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)


def test_manual_decoding_with_the_cache_argument_keeps_each_tokens_position():
    """Later transformers 5 releases name the cache ``cache`` (earlier ones ``past_key_values``): a
    step decoded with it sees the positions the cache implies, so its logits are those of the
    whole sequence's last position."""
    import inspect

    from transformers import DynamicCache, LlamaForCausalLM

    name = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"

    pmoe = PMoEModel(build_tiny("llama"), PMoEConfig(tau=2, rank=2, alpha=4))
    pmoe.add_task()
    perturb_adapters(pmoe, scale=0.3)
    ids = random_tokens(2, 9)
    mask = torch.ones_like(ids)
    with torch.no_grad():
        whole = pmoe(input_ids=ids, attention_mask=mask).logits[:, -1]
        cache = DynamicCache(config=pmoe.base_model.config)
        pmoe(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True, **{name: cache})
        step = pmoe(input_ids=ids[:, -1:], attention_mask=mask, use_cache=True, **{name: cache}).logits[:, -1]
    torch.testing.assert_close(step, whole, rtol=1e-4, atol=1e-5)


def test_the_default_config_is_what_moecl_run_builds_and_paper_is_the_papers():
    """One set of defaults: PMoEConfig() is the adapter config `moecl run` builds on its defaults;
    the paper's literal router is one named constructor, the one `--preset pmoe-paper` applies."""
    from moecl.config import PRESETS, RunConfig
    from moecl.methods.pmoe import PMoEMethod

    assert PMoEMethod(RunConfig()).adapter_config() == PMoEConfig()
    paper = PMoEConfig.paper()
    assert (paper.rank, paper.alpha, paper.target_modules) == (4, 8.0, None)
    preset = PMoEMethod(RunConfig(**{k: v for k, v in PRESETS["pmoe-paper"].items()})).adapter_config()
    router_fields = ("router_norm", "expert_init", "router_init", "freeze_router", "router_align", "router_detach")
    assert all(getattr(preset, f) == getattr(paper, f) for f in router_fields)


def test_saved_folders_use_moecl_names_and_neither_library_mistakes_the_others(tmp_path):
    peft = pytest.importorskip("peft")
    pmoe = _pmoe("llama", experts=1)
    pmoe.save_pretrained(tmp_path / "ours")
    assert sorted(p.name for p in (tmp_path / "ours").iterdir()) == ["moecl_adapter.json", "moecl_adapter.safetensors"]
    with pytest.raises(ValueError):  # PEFT finds no adapter_config.json: not its folder
        peft.PeftConfig.from_pretrained(str(tmp_path / "ours"))
    theirs = peft.get_peft_model(build_tiny("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ValueError, match="is a PEFT adapter folder .* peft.PeftModel.from_pretrained"):
        PMoEModel.from_pretrained(build_tiny("llama"), tmp_path / "peft")
    # A folder saved by an earlier moecl under PEFT's names, in moecl's schema, still loads.
    (tmp_path / "ours" / "moecl_adapter.json").rename(tmp_path / "ours" / "adapter_config.json")
    (tmp_path / "ours" / "moecl_adapter.safetensors").rename(tmp_path / "ours" / "adapter_model.safetensors")
    again = PMoEModel.from_pretrained(build_tiny("llama"), tmp_path / "ours")
    ids = random_tokens(2, 5)
    torch.testing.assert_close(again(input_ids=ids).logits, pmoe(input_ids=ids).logits)
