"""Task families, the task registry, task samplers and metrics."""
