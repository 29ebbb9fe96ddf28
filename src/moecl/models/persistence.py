"""Adapter folders (``moecl_adapter.json`` + ``moecl_adapter.safetensors``), shared by every
adapter model: atomic writes, and loads that name what disagrees and what to do."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel

from moecl.adapters.state import load_saved_state, saved_state_dict, upgrade_legacy_names
from moecl.io import atomic_path, atomic_write_json
from moecl.models.architectures import decoder_blocks, hidden_size

CONFIG_NAME = "moecl_adapter.json"
WEIGHTS_NAME = "moecl_adapter.safetensors"
"""moecl's own file names: a folder in PEFT's schema (``moecl export``) uses PEFT's names, so
neither library mistakes the other's folder for its own."""
LEGACY_NAMES = ("adapter_config.json", "adapter_model.safetensors")
"""The names folders written by earlier moecl versions used (PEFT's, with moecl's schema)."""


def adapter_files(directory: str | Path) -> tuple[Path, Path]:
    """``(config, weights)`` paths of the adapter folder ``directory``: moecl's names, or the
    earlier ones when only those hold a moecl config."""
    directory = Path(directory)
    config, weights = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    legacy = directory / LEGACY_NAMES[0]
    if not config.is_file() and legacy.is_file():
        try:
            saved = json.loads(legacy.read_text())
        except (ValueError, OSError):
            saved = {}
        if isinstance(saved, dict) and "peft_type" in saved:
            raise ValueError(
                f"{directory} is a PEFT adapter folder (peft_type {saved['peft_type']}), not a moecl one: load it "
                "with peft.PeftModel.from_pretrained; moecl's folders hold moecl_adapter.json"
            )
        if isinstance(saved, dict) and str(saved.get("format", "")).startswith("moecl."):
            return legacy, directory / LEGACY_NAMES[1]
    return config, weights


def describe_base(base_model: PreTrainedModel) -> dict[str, Any]:
    """What an adapter folder records of its base model, to refuse loading onto another one."""
    config = base_model.config
    return {
        "model_type": config.model_type,
        "architecture": type(base_model).__name__,
        "num_blocks": len(decoder_blocks(base_model)),
        "hidden_size": hidden_size(base_model),
        "vocab_size": getattr(config, "vocab_size", None),
        "name_or_path": getattr(config, "_name_or_path", ""),
    }


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """``tensors`` (moved to the CPU) as a safetensors file at ``path``, written under a temporary
    name and renamed, so a crash never leaves a half-written file under the final name."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_adapters(model: nn.Module, directory: str | Path, meta: dict[str, Any]) -> None:
    """Write ``meta`` (plus the base model's description) and every adapter tensor of ``model``.

    Both files go to a temporary name and are renamed, so a crash never leaves a half-written
    checkpoint under the final name.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    write_tensors(directory / WEIGHTS_NAME, saved_state_dict(model), {"format": "pt"})
    atomic_write_json(directory / CONFIG_NAME, {**meta, "base_model": describe_base(model.base_model)})


def read_adapter_meta(directory: str | Path, expected_format: str, kind: str) -> dict[str, Any]:
    """The saved ``moecl_adapter.json``, checked to be of ``expected_format`` (a ``kind`` model)."""
    config_path, _ = adapter_files(directory)
    if not config_path.is_file():
        raise ValueError(f"{config_path} not found: {directory} is not a saved {kind} adapter directory")
    try:
        meta = json.loads(config_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_path}: invalid JSON at line {err.lineno}: {err.msg}") from err
    if meta.get("format") != expected_format:
        raise ValueError(f"{config_path}: field 'format' is {meta.get('format')!r}, expected {expected_format!r}")
    return meta


def stored_elements(path: Path) -> int:
    """How many numbers ``path`` (a safetensors file) holds, read from its header alone."""
    if not path.is_file():
        raise ValueError(f"{path} not found: the adapter folder is incomplete")
    total = 0
    with safe_open(str(path), "pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
            n = 1
            for size in f.get_slice(key).get_shape():
                n *= size
            total += n
    return total


def load_adapters(
    model: nn.Module, directory: str | Path, meta: dict[str, Any], optional: frozenset[str] = frozenset()
) -> None:
    """Copy the saved adapter tensors into ``model``, built with the saved structure. Keys in
    ``optional`` (tensors newer than some saved folders) keep the model's value when absent.
    Folders from before the stacked expert layout (``frozen_A``/``expert_A``...) load as well."""
    directory = Path(directory)
    config_path, weights_path = adapter_files(directory)
    expected, actual = meta["base_model"], describe_base(model.base_model)
    for key in ("model_type", "num_blocks", "hidden_size", "vocab_size"):
        if expected.get(key) != actual[key]:
            raise ValueError(
                f"{config_path}: adapters were saved for a base model with {key}={expected.get(key)!r} "
                f"({expected.get('name_or_path') or expected.get('architecture')}), but the given base "
                f"model has {key}={actual[key]!r}; load them onto the base model they were trained on"
            )
    weights = load_file(str(weights_path))
    upgrade_legacy_names(model, weights)
    own = {k: v for k, v in saved_state_dict(model).items() if k in weights or k not in optional}
    if set(weights) != set(own):
        missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
        raise ValueError(
            f"{weights_path} does not match {config_path}: missing {missing[:5]}, "
            f"unexpected {extra[:5]}; the directory mixes files of different runs"
        )
    for key, tensor in own.items():
        if weights[key].shape != tensor.shape:
            raise ValueError(
                f"{weights_path}: tensor {key} has shape {tuple(weights[key].shape)}, "
                f"the model expects {tuple(tensor.shape)}; the config and weights disagree"
            )
    load_saved_state(model, weights)
