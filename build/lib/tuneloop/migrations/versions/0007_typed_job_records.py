"""Retraining jobs as typed records: rewrite the JSON written before them into the records' shapes.

- a gate check's numbers move into its `comparison` (the evaluators' MetricComparison): a, b, delta, CI, p-value,
  n, at the decision's level; the one MDE stored then (the paired one where measured) is kept as both `mde` and
  `paired_mde`, and `method` says the comparison was migrated;
- the watch drops `gate_sets` (the job's settings name its challenger sets) and its signals get a `kind` and
  their facts as fields;
- an Alertmanager trigger's `startsAt` becomes `starts_at`.

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

MIGRATED_METHOD = "paired bootstrap (migrated from a gate record written before typed records)"

jobs = sa.table("retrain_jobs", sa.column("id", sa.Integer), sa.column("decision", sa.JSON),
                sa.column("watch", sa.JSON))
triggers = sa.table("retrain_triggers", sa.column("id", sa.Integer), sa.column("source", sa.String),
                    sa.column("detail", sa.JSON))


def _check(check: dict[str, Any], decision: dict[str, Any]) -> dict[str, Any]:
    if "comparison" in check:
        return check
    measured = check.get("delta") is not None
    runs = check.get("runs") or []
    return {
        "dataset": check["dataset"], "role": check["role"], "n": check["n"], "mde": check.get("mde") or 0.0,
        "passed": check.get("passed", False), "reason": check.get("reason", ""),
        "comparison": {
            "metric": check.get("metric", decision.get("metric")), "a": check["champion"], "b": check["candidate"],
            "delta": check["delta"], "ci_low": check["ci_low"], "ci_high": check["ci_high"],
            "p_value": check["p_value"], "method": MIGRATED_METHOD, "level": decision["level"], "n": check["n"],
            "mde": check.get("mde"), "paired_mde": check.get("mde")} if measured else None,
        "runs": runs if len(runs) == 2 else None,
    }


def _signal(signal: dict[str, Any]) -> dict[str, Any]:
    if "kind" in signal:
        return signal
    name, facts = signal.get("name", ""), signal.get("facts") or {}
    base = {"regression": bool(signal.get("regression")), "message": signal.get("message", "")}
    if name == "error_rate":
        return {"kind": "error_rate", **base, **{k: int(facts.get(k, 0)) for k in
                                                 ("old_requests", "old_errors", "new_requests", "new_errors")},
                "p_value": facts.get("p_value")}
    if name == "label_shares":
        shares = {side: {k.split(":", 1)[1]: int(v) for k, v in facts.items() if k.startswith(f"{side}:")}
                  for side in ("old", "new")}
        return {"kind": "label_shares", **base, "regression": False, "p_value": facts.get("p_value", 1.0), **shares}
    runs = facts.get("runs") or []
    return {"kind": "evaluation", **base, "dataset": name.split(":", 1)[1] if name.startswith("eval:") else None,
            "comparison": None, "runs": runs if len(runs) == 2 else None}


def upgrade() -> None:
    connection = op.get_bind()
    for job_id, decision, watch in connection.execute(sa.select(jobs.c.id, jobs.c.decision, jobs.c.watch)).all():
        changed: dict[str, Any] = {}
        if decision and any("comparison" not in c for c in decision.get("checks", [])):
            checks = [_check(c, decision) for c in decision.get("checks", [])]
            changed["decision"] = {k: v for k, v in decision.items() if k != "checks"} | {"checks": checks}
        if watch and ("gate_sets" in watch or any("kind" not in s for s in watch.get("signals", []))):
            rest = {k: v for k, v in watch.items() if k not in ("gate_sets", "signals")}
            changed["watch"] = rest | {"signals": [_signal(s) for s in watch.get("signals", [])]}
        if changed:
            connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(**changed))
    for trigger_id, source, detail in connection.execute(
            sa.select(triggers.c.id, triggers.c.source, triggers.c.detail)).all():
        if source == "alertmanager" and detail and "startsAt" in detail:
            moved = {k: v for k, v in detail.items() if k != "startsAt"} | {"starts_at": detail["startsAt"]}
            connection.execute(sa.update(triggers).where(triggers.c.id == trigger_id).values(detail=moved))


def downgrade() -> None:
    connection = op.get_bind()
    for job_id, decision in connection.execute(sa.select(jobs.c.id, jobs.c.decision)).all():
        if not decision:
            continue
        flat = []
        for check in decision.get("checks", []):
            comparison = check.get("comparison") or {}
            flat.append({"dataset": check["dataset"], "role": check["role"], "metric": decision.get("metric"),
                         "n": check["n"], "champion": comparison.get("a"), "candidate": comparison.get("b"),
                         "delta": comparison.get("delta"), "ci_low": comparison.get("ci_low"),
                         "ci_high": comparison.get("ci_high"), "p_value": comparison.get("p_value"),
                         "mde": check.get("mde"), "passed": check.get("passed"), "reason": check.get("reason"),
                         "runs": check.get("runs") or []})
        connection.execute(sa.update(jobs).where(jobs.c.id == job_id).values(decision={**decision, "checks": flat}))
    for trigger_id, source, detail in connection.execute(
            sa.select(triggers.c.id, triggers.c.source, triggers.c.detail)).all():
        if source == "alertmanager" and detail and "starts_at" in detail:
            moved = {k: v for k, v in detail.items() if k != "starts_at"} | {"startsAt": detail["starts_at"]}
            connection.execute(sa.update(triggers).where(triggers.c.id == trigger_id).values(detail=moved))
