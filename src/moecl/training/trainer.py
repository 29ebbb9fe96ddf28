"""Training on one task of the stream: the loop every method shares (on Hugging Face Accelerate).

``accelerate launch`` runs it data-parallel: the data loader is sharded across processes and
gradients are averaged; the effective batch is ``micro_batch x accumulation x processes``.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader
from transformers import get_cosine_schedule_with_warmup

from moecl.config import RunConfig
from moecl.data.batches import Collator, LengthGroupedBatches, answer_loss, keeps_logits
from moecl.data.trace import Example
from moecl.methods.base import Method
from moecl.training.sharding import (
    gather_trained,
    load_optimizer_state,
    optimizer_state,
    replica_of,
    shards_parameters,
)


def accumulation_steps(config: RunConfig, processes: int) -> int:
    per_step = config.micro_batch_size * processes
    if config.batch_size % per_step:
        raise ValueError(
            f"batch_size={config.batch_size} is not a multiple of micro_batch_size x processes "
            f"= {config.micro_batch_size} x {processes}; change one of them"
        )
    return config.batch_size // per_step


def seed_everything(seed: int, task_index: int) -> None:
    """Seed every RNG from ``(seed, task)``, so a resumed run trains a task exactly as an
    uninterrupted one does."""
    value = random.Random(f"{seed}:{task_index}").randrange(2**31)
    random.seed(value)
    torch.manual_seed(value)


def train_task(
    accelerator: Accelerator,
    method: Method,
    model: nn.Module,
    collator: Collator,
    items: list[tuple[int, Example]],
    config: RunConfig,
    task_index: int,
    log: Callable[[dict[str, Any]], None],
    advance: Callable[[dict[str, Any]], None] | None = None,
    task_name: str | None = None,
    resume: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``items`` (the task's examples and the replay memory) for ``config.epochs``.
    A non-finite loss raises :class:`NonFiniteLoss` naming ``task_name`` and the step. After each
    optimizer step ``advance`` receives ``{step, total, loss, tokens_per_s}`` (for progress).

    Mid-task checkpoints: every ``config.save_every`` optimizer steps ``save`` receives a snapshot
    (step, micro-batches consumed, tokens, last loss, optimizer and schedule state, RNG states).
    Handed back as ``resume`` (with the model restored from the same checkpoint), training goes
    on from there exactly: the loader is replayed from the task's start with the same seed and
    the consumed micro-batches are skipped untrained, so every later batch, RNG draw and update
    is the one an uninterrupted run makes.

    Under an engine that shards parameters (FSDP, DeepSpeed) the task trains a replica of
    ``model`` and copies the trained tensors back into it at the end and before each mid-task
    checkpoint (:mod:`moecl.training.sharding`); ``model`` itself stays plain.

    Returns the task's training statistics (steps, tokens, seconds, last loss).
    """
    sharded = shards_parameters(accelerator)
    trained = replica_of(model) if sharded else model  # what the engine takes over
    accum = accumulation_steps(config, accelerator.num_processes)
    generator = torch.Generator().manual_seed(random.Random(f"order:{config.seed}:{task_index}").randrange(2**31))
    if config.length_window > 1:
        lengths = [collator.length(example) for _, example in items]
        batches = LengthGroupedBatches(lengths, config.micro_batch_size, generator, config.length_window)
        loader = DataLoader(items, batch_sampler=batches, collate_fn=collator)
    else:
        loader = DataLoader(
            items, batch_size=config.micro_batch_size, shuffle=True, generator=generator, collate_fn=collator
        )
    micro_per_epoch = math.ceil(len(items) / (config.micro_batch_size * accelerator.num_processes))
    total_steps = max(1, math.ceil(micro_per_epoch * config.epochs / accum))
    groups = method.parameter_groups(trained)
    fused = fused_adamw(groups)
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
    # The schedule is stepped by hand once per optimizer step (not handed to accelerate, which
    # would step it once per process).
    schedule = get_cosine_schedule_with_warmup(optimizer, int(config.warmup_ratio * total_steps), total_steps)
    step, micro, tokens, padded, last_loss = 0, 0, 0, 0, float("nan")
    window_loss, window = 0.0, 0  # summed loss and count of the optimizer step's micro-batches so far
    accelerator.gradient_accumulation_steps = accum
    ddp_model, optimizer, loader = accelerator.prepare(trained, optimizer, loader)
    if resume is not None:  # after prepare: a sharding engine loads each process's shard
        load_optimizer_state(trained, optimizer, resume["optimizer"], sharded)
        schedule.load_state_dict(resume["schedule"])
        step, tokens, last_loss = resume["step"], resume["tokens"], resume["last_loss"]
        padded = resume.get("padded", tokens)  # checkpoints from before the padding count: none counted
    ddp_model.train()
    keep_logits = keeps_logits(model)
    started, tokens_before = time.perf_counter(), tokens
    for _epoch in range(config.epochs):
        for batch in loader:
            micro += 1
            if resume is not None and micro <= resume["micro"]:  # trained before the interruption
                if micro == resume["micro"]:
                    torch.set_rng_state(resume["torch_rng"])
                    random.setstate(_tuples(resume["python_rng"]))
                continue
            with accelerator.accumulate(ddp_model):
                lm_loss = answer_loss(ddp_model, batch, keep_logits, method.forward_kwargs(batch))
                loss = method.loss(trained, batch, lm_loss)
                if not bool(torch.isfinite(loss.detach())):
                    raise NonFiniteLoss(
                        f"training {task_name or f'phase {task_index + 1}'}, optimizer step {step + 1}: the loss is "
                        f"{float(loss.detach()):g}; the run stopped before applying it, its last checkpoint intact. "
                        "Lower --lr (or a loss weight) and run again: it resumes from that checkpoint with the new "
                        "value (the options that may change on resume are listed in `moecl run --help`); or check "
                        "this task's data"
                    )
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    method.before_step(trained)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            window_loss, window = window_loss + loss.detach().float(), window + 1
            tokens += int(batch["attention_mask"].sum())
            padded += batch["attention_mask"].numel()
            if accelerator.sync_gradients:
                schedule.step()
                step += 1
                # The step's loss: the mean over its whole effective batch (every micro-batch of
                # every process), so logs read the same whatever the number of processes.
                last_loss = float(accelerator.reduce(window_loss / window, reduction="mean"))
                window_loss, window = 0.0, 0
                extra = method.step_log(trained, batch)  # only on logged steps: it reads values back
                log(
                    {
                        "task": task_index,
                        "step": step,
                        "loss": round(last_loss, 6),
                        "lr": schedule.get_last_lr()[0],
                        **extra,
                    }
                )
                if advance is not None:
                    rate = (tokens - tokens_before) * accelerator.num_processes / (time.perf_counter() - started)
                    advance({"step": step, "total": total_steps, "loss": last_loss, "tokens_per_s": rate})
                if save is not None and config.save_every and step % config.save_every == 0 and step < total_steps:
                    gather_trained(trained, model)
                    save(
                        {
                            "step": step,
                            "micro": micro,
                            "tokens": tokens,
                            "padded": padded,
                            "last_loss": last_loss,
                            "optimizer": optimizer_state(trained, optimizer, sharded),
                            "schedule": schedule.state_dict(),
                            "torch_rng": torch.get_rng_state(),
                            "python_rng": random.getstate(),
                        }
                    )
    seconds = time.perf_counter() - started  # the loop's time: the cleanup below (a full gc) is not training
    ddp_model.eval()
    gather_trained(trained, model)
    accelerator.free_memory()  # drop accelerate's references before the next task re-prepares
    return {
        "steps": step,
        "tokens": tokens * accelerator.num_processes,
        "padding": round(1 - tokens / padded, 4) if padded else 0.0,  # share of computed positions that were padding
        "last_loss": last_loss,
        "planned_steps": total_steps,
        "seconds": round(seconds, 2),  # this process's training loop (a resume: since it)
    }


def fused_adamw(groups: list[dict[str, Any]]) -> bool | None:
    """AdamW's fused kernel for float32 CPU parameters: one call per tensor instead of PyTorch's
    default Python loop over them on CPU (PMoE's 421 tensors: 11 -> 3 ms a step, the same update
    up to float rounding). Elsewhere (GPUs) PyTorch's own default (``None``: foreach there)."""
    params = [p for group in groups for p in group["params"]]
    return True if all(p.is_cpu and p.dtype == torch.float32 for p in params) else None


def _tuples(value: Any) -> Any:
    """``random.getstate()`` after a JSON round trip: its lists back to tuples."""
    return tuple(_tuples(v) for v in value) if isinstance(value, list) else value


class NonFiniteLoss(ValueError):
    """A training loss that is NaN or infinite: training stops instead of corrupting the weights."""
