"""The README's Python snippets and examples/quickstart.py run as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]


def _python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S)


@pytest.mark.parametrize("index", range(len(_python_blocks(ROOT / "README.md"))))
def test_readme_python_snippet_runs_as_written(tmp_path, monkeypatch, index):
    monkeypatch.chdir(tmp_path)  # the snippet writes relative paths
    monkeypatch.setenv("MOECL_CACHE", str(tmp_path / "cache"))
    code = _python_blocks(ROOT / "README.md")[index]
    exec(compile(code, f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})


def test_quickstart_runs_as_written(tmp_path):
    env = {"MOECL_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "logits identical = True" in done.stdout, done.stdout[-2000:]
