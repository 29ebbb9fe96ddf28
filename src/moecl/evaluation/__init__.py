"""Scores: TRACE's per-task metrics, the continual-learning matrix and its summaries."""
