"""Plain Markdown tables (GitHub style), for summaries printed and written next to results."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def mean_sd(values: np.ndarray, digits: int = 4) -> str:
    """``"m ± sd"`` over the runs in ``values`` (sample sd; 0 for one run)."""
    values = np.asarray(values, dtype=float)
    sd = values.std(ddof=1) if values.size > 1 else 0.0
    return f"{values.mean():.{digits}f} ± {sd:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; the first column is left-aligned, the others right-aligned."""
    align = [":---"] + ["---:"] * (len(header) - 1)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(align) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
