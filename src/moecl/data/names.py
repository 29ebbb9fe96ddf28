"""Task names: each is a plain folder name under the data root, whatever gives it (``--tasks``,
a manifest's ``order`` or ``default``), so no name reads data outside the root or writes
predictions outside the run folder."""

from __future__ import annotations

import re

_PLAIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_task_name(name: object, source: str) -> str:
    """``name`` if it is a plain folder name (letters, digits, ``. _ + -``, not starting with a dot
    or a dash); else ``ValueError`` naming ``source``."""
    if not isinstance(name, str) or not _PLAIN.match(name) or len(name) > 128:
        raise ValueError(
            f"{source}: task name {name!r} is not a plain folder name (letters, digits, '.', '_', '+', '-'; no "
            "path separators, no leading dot): each task is a folder directly under the data root"
        )
    return name
