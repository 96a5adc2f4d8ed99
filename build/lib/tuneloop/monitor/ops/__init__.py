"""The ops pack as code: alert and recording rules, Grafana dashboards and alert provisioning.

Everything under `grafana/` that names a metric is generated from here (`tuneloop ops build`), so a renamed
metric breaks a test instead of leaving a dead panel; hand-written files there only wire components together.
"""
