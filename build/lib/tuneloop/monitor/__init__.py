"""Monitoring: drift of captured traffic (calibrated views), the output view, the threshold policy and its incidents,
the store-backed Prometheus collector, and the lease-guarded scheduler behind `tuneloop run`."""
