"""The per-run HTML report (issue 16, point 4)."""

import re
import shutil
import subprocess

import pytest

from moecl.cli.main import main
from tests.conftest import tiny_run


def test_report_is_one_self_contained_page_with_the_runs_numbers(tmp_path, monkeypatch):
    results, out = tiny_run(tmp_path, monkeypatch, "pmoe", tasks=["sentiment", "parity"])
    assert main(["report", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert f"OP {results['OP']:.2f}" in page and "floor: majority" in page
    images = re.findall(r'src="?\'?data:image/png;base64,', page)
    assert len(images) >= 3  # allocation, loss, the newest expert's gate
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert main(["report", str(tmp_path)]) == 2  # not a run folder: a clear refusal


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium here (Debian: apt install chromium) to render the page")
def test_report_renders_in_a_headless_browser(tmp_path, monkeypatch):
    _, out = tiny_run(tmp_path, monkeypatch, "pmoe", tasks=["sentiment", "parity"])
    assert main(["report", str(out)]) == 0
    shot = tmp_path / "report.png"
    done = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            f"--screenshot={shot}",
            "--window-size=1200,2400",
            (out / "report.html").as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert shot.stat().st_size > 20_000  # a page with figures, not a blank one
