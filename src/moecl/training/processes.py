"""The processes of a run: its Accelerator (one per run, several runs per process in a study),
what the launch asked for and does not get, and gathering per-process results."""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator


def make_accelerator(device: torch.device, precision: str) -> Accelerator:
    """An Accelerator for this run. Accelerate keeps its state per process and refuses another
    precision once set; a study runs several runs in one process, which may differ in ``dtype``,
    so the precision part of that state (not the process group) is reset between them."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision") != precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    # cpu=True on a machine without CUDA: that is what makes `accelerate launch` start gloo
    # data parallelism over CPU processes instead of one independent run per process.
    return Accelerator(cpu=device.type == "cpu", mixed_precision=precision)


def engine_mismatch(accelerator: Accelerator) -> str | None:
    """What the ``accelerate launch`` config asked for and this run does not get, said at start.
    Accelerate (1.15) takes FSDP and DeepSpeed only on accelerator devices: CPU processes launched
    with ``configs/accelerate/fsdp.yaml`` run plain data parallelism over gloo instead."""
    from accelerate.utils import DistributedType

    for variable, engine, wanted in (
        ("ACCELERATE_USE_FSDP", "FSDP", DistributedType.FSDP),
        ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", DistributedType.DEEPSPEED),
    ):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != wanted:
            return (
                f"the launch asked for {engine}, but Accelerate runs this as {accelerator.distributed_type.value} "
                f"over {accelerator.num_processes} process(es): it takes {engine} only on GPUs (and other "
                "accelerators). Results are those of data parallelism; no memory is sharded"
            )
    return None


def gather(accelerator: Accelerator, items: list) -> list:
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)
