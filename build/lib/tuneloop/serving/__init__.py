"""Serving: the vLLM engine supervisor and the task gateway (next issue)."""
