"""The continual training template: one loop over the task stream, methods plug in at its seams."""
