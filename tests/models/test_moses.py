"""MoSEs: exactly k sub-experts per token, isolation of finished tasks, sub-linear capacity,
task-keyed routing (given and inferred), save and load."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moecl.adapters.state import adapter_state_dict
from moecl.models.moses import MoSEsConfig, MoSEsModel
from tests.conftest import build_tiny, perturb_adapters, random_tokens, tiny_run


def _model(family: str = "llama", tasks: int = 1, **config) -> MoSEsModel:
    model = MoSEsModel(build_tiny(family, layers=2), MoSEsConfig(**config))
    for _ in range(tasks):
        model.add_task()
    routing = {k: v.clone() for k, v in adapter_state_dict(model).items() if ".gate." in k}
    perturb_adapters(model)  # sub-experts move off their zero B; routing keeps its -inf entries
    with torch.no_grad():
        for k, v in adapter_state_dict(model).items():
            if k in routing:
                v.copy_(routing[k])
    return model


def test_exactly_k_sub_experts_contribute_to_each_token(family):
    model = _model(family, tasks=2, top_k=2, initial_experts=4, new_per_task=2)
    bank = model.banks()[0]
    x = torch.randn(3, 5, bank.in_features)
    model.routing.task_ids = torch.tensor([0, 1, 1])
    gate = bank.gate.read(x, bank.num_experts)  # (3, 5, 6)
    assert gate.shape == (3, 5, 6)
    assert ((gate > 0).sum(-1) == 2).all() and torch.allclose(gate.sum(-1), torch.ones(3, 5))
    assert (gate[0, :, 4:] == 0).all()  # task 0 cannot reach the sub-experts task 1 opened
    # The fused delta equals a loop over each token's two selected sub-experts only.
    a_cat, b_cat = bank.stacked_weights()
    expected = torch.zeros(3, 5, bank.out_features)
    for b in range(3):
        for s in range(5):
            for j in gate[b, s].nonzero().flatten().tolist():
                rows = slice(j * bank.rank, (j + 1) * bank.rank)
                expert = b_cat[:, rows] @ (a_cat[rows] @ x[b, s]) * bank.scaling
                expected[b, s] += gate[b, s, j] * expert
    assert torch.allclose(bank.delta(x, gate), expected, atol=1e-5)


def test_routing_needs_a_task_and_generation_keeps_it():
    model = _model(tasks=2)
    ids = random_tokens(2, 6)
    with pytest.raises(ValueError, match="routes by task"):
        model(ids)
    model.given_task = 1
    with torch.no_grad():
        as_one = model(ids).logits
        explicit = model(ids, task_ids=torch.tensor([1, 1])).logits
        other = model(ids, task_ids=torch.tensor([0, 0])).logits
    assert torch.equal(as_one, explicit) and not torch.allclose(as_one, other)
    with pytest.raises(ValueError, match="has no routing"):
        model(ids, task_ids=torch.tensor([2, 0]))
    # Greedy generation with a cache routes every new token as the prompt did.
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False)
        seq = ids
        for _ in range(4):
            nxt = model(seq, task_ids=torch.tensor([1, 1]), use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(out, seq)


def test_task_inference_picks_the_nearest_task_key():
    model = _model(tasks=2)
    a, b = torch.full((4, 6), 7), torch.full((4, 6), 50)
    mask = torch.ones_like(a)
    model.learn_task_key(0, [{"input_ids": a, "attention_mask": mask}])
    model.learn_task_key(1, [{"input_ids": b, "attention_mask": mask}])
    queries = torch.tensor([[0, 0, 50, 50, 50], [7, 7, 7, 7, 7], [0, 0, 0, 7, 7]])
    left_padded = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]])
    assert model.infer_task_ids(queries, left_padded).tolist() == [1, 0, 0]


def test_save_and_load_give_identical_outputs(tmp_path):
    model = _model(tasks=2)
    model.learn_task_key(0, [{"input_ids": random_tokens(2, 5), "attention_mask": torch.ones(2, 5, dtype=torch.long)}])
    model.save_pretrained(tmp_path)
    loaded = MoSEsModel.from_pretrained(build_tiny("llama", layers=2), tmp_path)
    ids = random_tokens(2, 6)
    with torch.no_grad():
        routes = torch.tensor([0, 1])
        assert torch.equal(loaded(ids, task_ids=routes).logits, model(ids, task_ids=routes).logits)
    assert torch.equal(loaded.prototypes.keys, model.prototypes.keys)
    assert loaded.parameter_counts() == model.parameter_counts()


def _run(tmp_path: Path, monkeypatch, task_id: str):
    targets = ["q_proj", "v_proj", "o_proj"]
    return tiny_run(tmp_path, monkeypatch, task_id, method="moses", task_id=task_id, epochs=2, target_modules=targets)


def test_run_isolates_finished_tasks_grows_sub_linearly_and_reproduces_scores(tmp_path, monkeypatch):
    results, out = _run(tmp_path, monkeypatch, task_id="given")
    R, T = results["R"], 3
    # TIL: routing a finished task uses only its frozen sub-experts, so its score never moves.
    assert all(R[t][i] == R[i][i] for t in range(T) for i in range(t + 1))
    assert [results["transfer"][i][i] for i in range(T)] == R[-1]
    capacity = results["capacity"]
    assert len(capacity) == T and capacity[0] < capacity[1] < capacity[2] < T * capacity[0]
    after = [load_file(str(out / "checkpoints" / f"task-{t}" / "moecl_adapter.safetensors")) for t in range(T)]
    key = next(k for k in after[0] if k.endswith("q_proj.experts_A")).rpartition(".")[0]
    r = 2  # every sub-expert of every task in one stack, whichever trained when it was saved
    assert after[0][f"{key}.experts_A"].shape[0] == 4 * r  # the 4 sub-experts of task 0
    assert torch.equal(after[1][f"{key}.experts_A"][: 4 * r], after[0][f"{key}.experts_A"])
    assert torch.equal(after[2][f"{key}.experts_A"][: 4 * r], after[0][f"{key}.experts_A"])
    task1 = after[1][f"{key}.experts_B"][:, 4 * r :]
    assert torch.equal(after[2][f"{key}.experts_B"][:, 4 * r : 4 * r + task1.shape[1]], task1)
    assert torch.equal(after[2][f"{key}.gate.frozen_bias"][0, :4], after[0][f"{key}.gate.bias"])
    assert torch.isinf(after[2][f"{key}.gate.frozen_bias"][0, 4:]).all()  # later sub-experts unreachable
    assert (out / "transfer.json").is_file() and (out / "transfer.png").stat().st_size > 1000


def test_inferred_task_ids_report_how_often_the_task_is_found(tmp_path, monkeypatch):
    results, _ = _run(tmp_path, monkeypatch, task_id="inferred")
    inference = results["task_inference"]
    assert [sum(row) for row in inference["confusion"]] == [6, 6, 6]
    assert all(0.0 <= a <= 1.0 for a in inference["accuracy"]) and results["task_id"] == "inferred"
