"""Evaluation: metrics, statistics (bootstrap CIs, paired tests) and runners that score served adapters."""
