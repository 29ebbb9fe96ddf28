"""Training a replica under a sharding engine (moecl.training.sharding): FSDP2 itself on two CPU
processes over gloo (torch's ``fully_shard``, which Accelerate applies on GPUs only), and the run's
replica path against its plain path."""

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import build_tiny, random_tokens

from moecl.config import config_from_options
from moecl.models.pmoe import PMoEModel
from moecl.models.pmoe_config import PMoEConfig
from moecl.training import trainer
from moecl.training.run import run
from moecl.training.sharding import gather_trained, load_optimizer_state, optimizer_state, replica_of


def _pmoe(experts: int) -> PMoEModel:
    """A tiny Llama PMoE whose first ``experts - 1`` experts are trained (random) and frozen."""
    torch.manual_seed(0)
    model = PMoEModel(build_tiny("llama"), PMoEConfig(tau=0.5, rank=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    for _ in range(experts):
        model.add_task(None)
        with torch.no_grad():
            for p in model.trainable_parameters():
                p.add_(torch.randn_like(p) * 0.1)
        model.end_task()
    return model


def test_a_replica_aliases_the_frozen_tensors_and_owns_the_trained_ones():
    model = _pmoe(2)
    replica = replica_of(model)
    plain = dict(model.named_parameters()) | dict(model.named_buffers())
    copied = dict(replica.named_parameters()) | dict(replica.named_buffers())
    assert plain.keys() == copied.keys()
    for name, tensor in plain.items():
        twin = copied[name]
        assert twin is not tensor if isinstance(tensor, torch.nn.Parameter) else twin is tensor
        assert (twin.data_ptr() == tensor.data_ptr()) == (not tensor.requires_grad), name
        assert torch.equal(twin, tensor) and twin.requires_grad == tensor.requires_grad
    # An engine casting the replica (as DeepSpeed does) leaves the plain model as it was.
    replica.to(torch.float64)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    # The replica's banks read the replica's own gate.
    bank = next(m for m in replica.modules() if hasattr(m, "frozen_A"))
    assert bank.gate is replica.gate and replica.gate is not model.gate


def _auto_wrapped(model) -> list:
    """The submodules Accelerate's FSDP2 prepare shards on their own (``fully_shard``, bottom up)
    under ``fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP`` (configs/accelerate/fsdp.yaml)."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy, get_module_children_bottom_up

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap")
    plugin.set_auto_wrap_policy(model)
    policy = fsdp2_prepare_auto_wrap_policy(plugin, model)
    return [m for m in get_module_children_bottom_up(model)[:-1] if policy(m)]


def test_accelerates_fsdp_auto_wrap_shards_an_adapter_model_block_by_block():
    model = _pmoe(1)
    assert _auto_wrapped(model) == list(model.base_model.model.layers)


def _fsdp_worker(rank: int, world: int, init: str, out: str) -> None:
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    model = _pmoe(2)
    frozen = {k: v.clone() for k, v in model.named_buffers()}
    ids = random_tokens(4, 12)
    mine = ids[rank * 2 : (rank + 1) * 2]  # the process's half of each batch

    def shard(module):  # as Accelerate's FSDP2 prepare does, with its transformer auto-wrap policy
        for block in _auto_wrapped(module):
            fully_shard(block)
        return fully_shard(module)

    def steps(module, optimizer, batch, n):
        for _ in range(n):
            module(input_ids=batch, labels=batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

    def adamw(module):
        return torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-2)

    reference = copy.deepcopy(model).train()
    steps(reference, adamw(reference), ids, 4)
    # Two steps, a checkpoint (whole optimizer state), a fresh replica from the plain model with
    # that state, two more steps: as four uninterrupted steps on the whole batch.
    replica = shard(replica_of(model)).train()
    optimizer = adamw(replica)
    steps(replica, optimizer, mine, 2)
    state = optimizer_state(replica, optimizer, sharded=True)
    gather_trained(replica, model)
    replica = shard(replica_of(model)).train()
    optimizer = adamw(replica)
    load_optimizer_state(replica, optimizer, state, sharded=True)
    steps(replica, optimizer, mine, 2)
    gather_trained(replica, model)
    trained = dict(reference.named_parameters())
    diff = max((p - trained[n]).abs().max().item() for n, p in model.named_parameters() if p.requires_grad)
    start = dict(_pmoe(2).named_parameters())
    moved = max((p - start[n]).abs().max().item() for n, p in trained.items())
    frozen_same = all(torch.equal(v, dict(model.named_buffers())[k]) for k, v in frozen.items())
    model.end_task()
    model.add_task(None)  # growth on the plain model after sharded training
    result = {
        "diff": diff,
        "moved": moved,
        "frozen_same": frozen_same,
        "experts": model.num_experts,
        "state_names": sorted(state["state"]),
    }
    Path(out, f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def test_fsdp2_on_two_cpu_processes_trains_a_replica_to_the_single_process_numbers(tmp_path):
    """FSDP2 shards the replica over 2 gloo processes, each on half of every batch; a whole
    optimizer checkpoint taken from the shards and loaded into a fresh replica goes on exactly.
    The plain model ends with the numbers of 4 plain steps on the whole batch, then grows."""
    mp.spawn(_fsdp_worker, args=(2, f"file://{tmp_path / 'group'}", str(tmp_path)), nprocs=2, join=True)
    results = [json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1)]
    for result in results:
        assert result["moved"] > 1e-3  # training changed the weights, so equality says something
        assert result["diff"] < 1e-5
        assert result["frozen_same"] and result["experts"] == 3
        assert result["state_names"] and all(
            "expert_" in n or "lora_" in n or "router" in n for n in result["state_names"]
        )
    assert results[0]["diff"] == results[1]["diff"]


@pytest.mark.parametrize("method", ["pmoe", "moses"])
def test_the_run_trains_a_replica_under_a_sharding_engine_to_the_same_numbers(tmp_path, monkeypatch, method):
    """One process, the replica path forced: what FSDP or DeepSpeed runs take (copy, train the
    copy, gather back before a checkpoint and after the task) gives the plain path's numbers,
    for PMoE's shared router and MoSEs' per-layer ones."""
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    options = dict(preset="smoke", method=method, epochs=2, train_size=24, test_size=12, save_every=2)
    config = config_from_options(options)
    plain = run(config, tmp_path / "plain")
    monkeypatch.setattr(trainer, "shards_parameters", lambda accelerator: True)
    replica = run(config, tmp_path / "replica")
    assert replica["R"] == plain["R"] and replica.get("router_allocation") == plain.get("router_allocation")
    logs = [(tmp_path / n / "log.jsonl").read_text() for n in ("plain", "replica")]
    assert logs[0] == logs[1]
    losses = [json.loads(line)["loss"] for line in logs[0].splitlines() if json.loads(line)["task"] == 0]
    assert losses[-1] < losses[0]  # it trained, so equal logs say something
