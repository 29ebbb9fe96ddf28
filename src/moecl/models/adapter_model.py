"""What every moecl adapter model shares: surgery on a Hugging Face causal LM's decoder blocks,
the trainable set, a forward that keeps left-padded positions right, checkpointing, generation.

:class:`~moecl.models.pmoe.PMoEModel` and :class:`~moecl.models.moses.MoSEsModel` differ only in
which adapter they put on each target projection and how its gate is fed.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from moecl.adapters.lora import LINEAR_TYPES
from moecl.adapters.state import ADAPTER_TYPES, named_adapter_parameters, parameter_counts, saved_state_dict
from moecl.models.architectures import check_causal_lm, decoder_blocks, default_target_modules
from moecl.models.persistence import (
    adapter_files,
    load_adapters,
    read_adapter_meta,
    save_adapters,
    stored_elements,
)


def _matches(path_in_block: str, targets: list[str]) -> bool:
    return any(path_in_block == t or path_in_block.endswith("." + t) for t in targets)


def _linear_paths(block: nn.Module) -> list[str]:
    return [name for name, m in block.named_modules() if name and isinstance(m, LINEAR_TYPES)]


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding, so a padded sequence sees the positions it sees alone."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class AdapterModel(nn.Module):
    """A causal LM whose target projections carry moecl adapters; the base weights stay frozen.

    Args:
        base_model: a Hugging Face decoder-only causal LM (``AutoModelForCausalLM``).
        target_modules: projections to adapt in every block (``None``: the family's q and v;
            ``["all-linear"]``: every linear layer of the blocks, saved as their names).

    A subclass names its saved ``FORMAT``, its ``CONFIG`` dataclass with the JSON key it is saved
    under (``CONFIG_KEY``), and the meta key counting its grown tasks (``TASKS_KEY``), and
    provides ``adapter_config``, ``add_task()`` and ``num_tasks``. ``config`` is the base model's
    Hugging Face config, as on any Hugging Face model (PEFT keeps its own as ``peft_config`` the
    same way).
    """

    FORMAT: ClassVar[str]
    CONFIG: ClassVar[type]
    CONFIG_KEY: ClassVar[str]
    TASKS_KEY: ClassVar[str] = "num_tasks"
    OPTIONAL_KEYS: ClassVar[frozenset[str]] = frozenset()
    """Saved tensors a folder written by an older moecl may lack (their initial value is right)."""

    def __init__(self, base_model: PreTrainedModel, target_modules: list[str] | None):
        super().__init__()
        check_causal_lm(base_model)
        if any(isinstance(m, ADAPTER_TYPES) for m in base_model.modules()):
            raise ValueError("base_model already carries moecl adapters; pass a fresh base model")
        self.base_model = base_model
        base_model.requires_grad_(False)
        # A tuple, not the ModuleList itself: assigning that would register every block a second
        # time (as `blocks.*` beside `base_model.*`) and double the model's state_dict.
        self.blocks = tuple(decoder_blocks(base_model))
        self.num_blocks = len(self.blocks)
        targets = list(target_modules or default_target_modules(base_model))
        if targets == ["all-linear"]:  # PEFT's spelling: every linear layer of the decoder blocks
            targets = sorted({p.rpartition(".")[2] for block in self.blocks for p in _linear_paths(block)})
        self.target_modules = targets
        self._check_targets()
        self._forward_params = set(inspect.signature(base_model.forward).parameters)

    @property
    def config(self) -> Any:
        """The base model's Hugging Face config (the adapters' own is :attr:`adapter_config`)."""
        return self.base_model.config

    @property
    def _no_split_modules(self) -> list[str]:
        """The base model's decoder-block classes, which Accelerate's FSDP auto-wrap reads off the
        model it prepares to shard block by block (without them it shards the model as one unit)."""
        return list(getattr(self.base_model, "_no_split_modules", None) or [])

    def _check_targets(self) -> None:
        available = sorted({p for block in self.blocks for p in _linear_paths(block)})
        for target in self.target_modules:
            if not any(_matches(p, [target]) for p in available):
                leaves = sorted({p.rpartition(".")[2] for p in available})
                raise ValueError(
                    f"target module {target!r} is not a linear layer in the decoder blocks of "
                    f"{type(self.base_model).__name__}; linear layers there: {', '.join(leaves)}"
                )

    def wrap_targets(self, make_adapter: Callable[[int, nn.Module], nn.Module]) -> None:
        """Replace every target projection of block ``i`` by ``make_adapter(i, projection)``."""
        for index, block in enumerate(self.blocks):
            for path in _linear_paths(block):
                if not _matches(path, self.target_modules):
                    continue
                parent_path, _, leaf = path.rpartition(".")
                parent = block.get_submodule(parent_path) if parent_path else block
                setattr(parent, leaf, make_adapter(index, getattr(parent, leaf)))

    # -- training -------------------------------------------------------------------------

    def named_trainable_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Every adapter parameter: exactly what the current task trains; nothing else."""
        return named_adapter_parameters(self)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Exactly what the current task may train (hand these to the optimizer)."""
        return [p for _, p in self.named_trainable_parameters()]

    def parameter_counts(self) -> tuple[int, int]:
        """``(trainable, total)`` element counts, frozen experts counted in the total."""
        return parameter_counts(self)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        """Checkpoint the base model's blocks. Only non-reentrant checkpointing keeps the gradient
        of a gate that enters blocks from outside their arguments, so it is forced."""
        kwargs = dict(gradient_checkpointing_kwargs or {})
        if kwargs.setdefault("use_reentrant", False):
            raise ValueError("use_reentrant=True would cut the router's gradient; use use_reentrant=False")
        if hasattr(self.base_model, "activation_checkpointing_enable"):  # transformers >= 5
            self.base_model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    # -- forward and generation -------------------------------------------------------------

    def forward(
        self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None, **kwargs: Any
    ) -> CausalLMOutputWithPast:
        """The base model's forward (same arguments, same output) with the adapters active.

        Without explicit ``position_ids`` and cache, positions are derived from the attention
        mask so that left padding does not shift a sequence's positions.
        """
        if (
            attention_mask is not None
            and "position_ids" in self._forward_params
            and kwargs.get("position_ids") is None
            and kwargs.get("past_key_values") is None  # transformers 4's name for the cache
            and kwargs.get("cache") is None  # transformers 5's
        ):
            kwargs["position_ids"] = _position_ids(attention_mask)
        return self.base_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``base_model.generate`` with the adapters active."""
        return self.base_model.generate(*args, **kwargs)

    # -- persistence ---------------------------------------------------------------------------

    def save_meta(self) -> dict[str, Any]:
        """What ``moecl_adapter.json`` holds besides the base model's description."""
        return {
            "format": self.FORMAT,
            self.CONFIG_KEY: self.adapter_config.to_dict(),
            "target_modules": self.target_modules,
            self.TASKS_KEY: self.num_tasks,
        }

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        """Write ``moecl_adapter.json`` and ``moecl_adapter.safetensors`` (adapter tensors only),
        atomically."""
        save_adapters(self, save_directory, self.save_meta())

    @classmethod
    def from_pretrained(cls, base_model: PreTrainedModel, directory: str | os.PathLike):
        """Rebuild saved adapters on ``base_model``: same structure, same tensors; the newest
        task's adapters are trainable, as when saved."""
        meta = read_adapter_meta(directory, cls.FORMAT, cls.__name__.removesuffix("Model"))
        config_path, weights_path = adapter_files(directory)
        tasks = meta.get(cls.TASKS_KEY)
        if not isinstance(tasks, int) or isinstance(tasks, bool) or tasks < 0:
            raise ValueError(f"{config_path}: field {cls.TASKS_KEY!r} is {tasks!r}, expected a count >= 0")
        stored = stored_elements(weights_path)  # the header only: a false count fails before it is built
        saved = meta[cls.CONFIG_KEY]
        model = cls(
            base_model, cls.CONFIG.from_saved(saved) if hasattr(cls.CONFIG, "from_saved") else cls.CONFIG(**saved)
        )
        for built in range(tasks):
            model.add_task()
            own = sum(v.numel() for k, v in saved_state_dict(model).items() if k not in cls.OPTIONAL_KEYS)
            if own > stored and built:  # beyond the first task: the weights hold fewer tasks (a
                # first task already too big means other tensors disagree: load_adapters names them)
                raise ValueError(
                    f"{config_path}: {cls.TASKS_KEY} is {tasks}, but {weights_path} holds the tensors of at most "
                    f"{built}; the config and weights disagree (files of different runs?)"
                )
        load_adapters(model, directory, meta, cls.OPTIONAL_KEYS)
        return model
