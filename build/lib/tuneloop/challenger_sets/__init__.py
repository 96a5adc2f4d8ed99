"""Versioned evaluation and training data: one JSONL record format, manifests, loaders and leakage checks."""
