"""Task streams: TRACE's on-disk format, its loader, and the streams we build into it."""

from moecl.data.trace import DataError, Example, Task, load_benchmark

__all__ = ["DataError", "Example", "Task", "load_benchmark"]
