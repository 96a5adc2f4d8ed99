"""Monitoring: drift, the Prometheus exporter, policy and scheduler (later issue)."""
