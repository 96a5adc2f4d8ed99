"""The five Grafana dashboards, declared as data and built with grafana-foundation-sdk.

Panels are `PanelSpec`s first (title, description, queries, unit) so the same declarations feed the JSON, the
panel list in docs/dashboards.md, and the tests that run every query against a real Prometheus and check every
metric name against what tuneloop and vLLM export.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from grafana_foundation_sdk.builders import prometheus, stat, table, timeseries
from grafana_foundation_sdk.builders.dashboard import (
    AnnotationQuery,
    Dashboard,
    DashboardLink,
    DatasourceVariable,
    QueryVariable,
    Row,
    TextBoxVariable,
)
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import (
    DashboardLinkType,
    DataSourceRef,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)

PanelKind = Literal["timeseries", "stat", "table"]
DATASOURCE = DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["tuneloop"]


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    queries: tuple[Query, ...]
    kind: PanelKind = "timeseries"
    unit: str = "short"
    width: int = 12
    height: int = 8
    mappings: dict[str, tuple[str, str]] = field(default_factory=dict)  # value -> (text, colour)
    link: tuple[str, str] | None = None  # (title, url) data link
    decimals: int | None = None


@dataclass(frozen=True)
class Annotation:
    name: str
    expr: str
    colour: str
    text: str


@dataclass(frozen=True)
class DashboardSpec:
    uid: str
    title: str
    description: str
    rows: tuple[tuple[str, tuple[PanelSpec, ...]], ...]
    variables: tuple[str, ...] = ("task",)
    annotations: tuple[Annotation, ...] = ()

    def panels(self) -> list[PanelSpec]:
        return [panel for _, panels in self.rows for panel in panels]


def q(expr: str, legend: str = "") -> tuple[Query, ...]:
    return (Query(expr, legend),)


T = 'task=~"$task"'
TA = 'task=~"$task", adapter=~"$adapter"'
ON_OFF = {"0": ("OK", "green"), "1": ("DRIFT", "red")}
PROMOTED = {"0": ("rejected", "orange"), "1": ("promoted", "green")}
UP = {"0": ("down", "red"), "1": ("up", "green")}

OVERVIEW = DashboardSpec(
    "tuneloop-overview", "tuneloop / Overview",
    "Every task at a glance: its champion, its primary metric on each set with the CI, drift, incidents and "
    "the last retraining outcome.",
    (
        ("Tasks", (
            PanelSpec("Champion version", "Version number of each task's champion adapter (the one users get).",
                      q(f"tuneloop_champion_version{{{T}}}", "{{task}}"), "stat", width=6, height=5),
            PanelSpec("Drift", "Latest drift verdict per task: DRIFT when any view crossed its calibrated "
                      "threshold in the latest check.", q(f"tuneloop_drift_detected{{{T}}}", "{{task}}"), "stat",
                      width=6, height=5, mappings=ON_OFF),
            PanelSpec("Open incidents", "Policy incidents open per task (floor breaches, significant drops, "
                      "sustained drift).", q(f'tuneloop_incidents_open{{{T}, rule="any"}}', "{{task}}"), "stat",
                      width=6, height=5),
            PanelSpec("Last gate decision", "Outcome of the task's latest retraining gate: promoted or rejected "
                      "(see the Retraining dashboard for the deltas behind it).",
                      q(f"tuneloop_gate_promoted{{{T}}}", "{{task}}"), "stat", width=6, height=5,
                      mappings=PROMOTED),
        )),
        ("Quality", (
            PanelSpec("Champion primary metric per set, with CI",
                      "The champion's primary metric on every evaluated set (held-out and challenger splits), "
                      "with the lower and upper bounds of its confidence interval.",
                      (Query(f"tuneloop:champion_primary_score{{{T}}}", "{{task}} {{dataset}} {{metric}}"),
                       Query(f"tuneloop:champion_primary_score_ci_lower{{{T}}}", "{{task}} {{dataset}} lower"),
                       Query(f"tuneloop:champion_primary_score_ci_upper{{{T}}}", "{{task}} {{dataset}} upper")),
                      unit="percentunit", width=16, height=9),
            PanelSpec("Champion scores (latest)", "Latest score of the champion per task, set and metric: the "
                      "numbers alerts and the policy read.",
                      (Query(f"tuneloop:champion_eval_score{{{T}}}"),), "table", unit="percentunit", width=8,
                      height=9, decimals=3),
        )),
        ("Health", (
            PanelSpec("Scrape targets", "Prometheus's view of the tuneloop gateway and vLLM targets.",
                      q('up{job=~"tuneloop|vllm"}', "{{job}}"), "stat", width=8, height=5, mappings=UP),
            PanelSpec("Engine", "1 while vLLM answers the gateway's health check.",
                      q("tuneloop_engine_up", "vLLM"), "stat", width=8, height=5, mappings=UP),
            PanelSpec("Retraining jobs running", "Jobs queued, training or evaluating, per task (at most one each).",
                      q(f'sum by (task) (tuneloop_retrain_jobs{{{T}, state=~"queued|training|evaluating"}})',
                        "{{task}}"), "stat", width=8, height=5),
        )),
    ),
)

QUALITY = DashboardSpec(
    "tuneloop-task-quality", "tuneloop / Task quality",
    "Metric time series per dataset and adapter version, with promotions and rollbacks marked, and per-slice "
    "scores.",
    (
        ("Scores", (
            PanelSpec("Score per dataset and adapter", "Latest eval score of each served adapter version (and the "
                      "base model) on each dataset, for the selected metric.",
                      q(f'tuneloop_eval_score{{{TA}, metric=~"$metric"}}', "{{adapter}} {{dataset}} {{metric}}"),
                      unit="percentunit", width=24, height=9),
            PanelSpec("Champion with confidence band", "The champion's score and the bounds of its confidence "
                      "interval: a change inside the band is noise.",
                      (Query(f'tuneloop:champion_eval_score{{{T}, metric=~"$metric"}}',
                             "{{dataset}} {{metric}}"),
                       Query(f'tuneloop:champion_eval_score_ci_lower{{{T}, metric=~"$metric"}}',
                             "{{dataset}} lower"),
                       Query(f'tuneloop:champion_eval_score_ci_upper{{{T}, metric=~"$metric"}}',
                             "{{dataset}} upper")), unit="percentunit"),
            PanelSpec("Distance to the floor (CI upper bound)", "Upper CI bound of the champion's score minus the "
                      "policy floor; below 0 the breach is significant and TuneloopQualityBelowFloor fires.",
                      q(f"tuneloop:champion_eval_score_ci_upper{{{T}}} - on(task, dataset, metric) group_left() "
                        "tuneloop_quality_floor", "{{dataset}} {{metric}}"), unit="percentunit"),
        )),
        ("Live traffic, before the labels (estimates)", (
            PanelSpec("Estimated metric on live traffic, with intervals", "Latest estimate of the metric on the "
                      "last window of served answers: label_free (calibrated confidence alone; assumes the held-out "
                      "calibration still holds), prediction_powered (corrected by the window's labels; valid "
                      "whatever the signal) and labels_only. Compare with the labelled scores above.",
                      (Query(f'tuneloop_quality_estimate{{{T}, metric=~"$metric"}}', "{{adapter}} {{method}}"),
                       Query(f'tuneloop_quality_estimate_ci_lower{{{T}, metric=~"$metric"}}',
                             "{{adapter}} {{method}} lower"),
                       Query(f'tuneloop_quality_estimate_ci_upper{{{T}, metric=~"$metric"}}',
                             "{{adapter}} {{method}} upper")), unit="percentunit", width=16),
            PanelSpec("Labels behind the estimate", "Answers of the estimated window with and without feedback: "
                      "the prediction-powered interval narrows as labels arrive.",
                      (Query(f'tuneloop_quality_estimate_labelled_answers{{{T}, method="prediction_powered"}}',
                             "{{adapter}} labelled"),
                       Query(f'tuneloop_quality_estimate_unlabelled_answers{{{T}, method="prediction_powered"}}',
                             "{{adapter}} unlabelled")), width=8),
        )),
        ("Slices and freshness", (
            PanelSpec("Score per slice", "Latest score on each value of the task's `slice_by` fields (bias "
                      "across groups); slices under min_slice_size are not scored.",
                      q(f'tuneloop_eval_slice_score{{{TA}, metric=~"$metric"}}',
                        "{{adapter}} {{dataset}} {{slice_field}}={{slice}}"), "table", unit="percentunit",
                      decimals=3),
            PanelSpec("Examples per eval", "Examples behind each latest score: small sets mean wide intervals.",
                      q(f"tuneloop_eval_examples{{{TA}}}", "{{adapter}} {{dataset}}")),
            PanelSpec("Eval age", "Time since each latest eval finished.",
                      q(f"time() - tuneloop_eval_finished_timestamp_seconds{{{TA}}}", "{{adapter}} {{dataset}}"),
                      unit="s"),
        )),
    ),
    variables=("task", "adapter", "metric"),
    annotations=(
        Annotation("Promotions", f"changes(tuneloop_champion_version{{{T}}}[5m]) > 0", "green",
                   "{{task}} champion changed"),
        Annotation("Rollbacks", f"increase(tuneloop_rollbacks_total{{{T}}}[5m]) > 0", "red",
                   "{{task}} rolled back"),
    ),
)

DRIFT = DashboardSpec(
    "tuneloop-drift", "tuneloop / Drift",
    "Per view drift score against its calibrated threshold, window sizes, the false-alarm rate measured at "
    "calibration, and links to the saved Evidently reports.",
    (
        ("Views", (
            PanelSpec("Drift score and threshold per view", "Each view's latest drift statistic and the threshold "
                      "calibrated for this window size on no-drift windows.",
                      (Query(f"tuneloop_drift_score{{{T}}}", "{{task}} {{view}} score"),
                       Query(f"tuneloop_drift_threshold{{{T}}}", "{{task}} {{view}} threshold")), width=16),
            PanelSpec("Views over threshold", "1 for each view that crossed its threshold in the latest check.",
                      q(f"tuneloop_drift_view_detected{{{T}}}", "{{task}} {{view}}"), "stat", width=8,
                      mappings=ON_OFF),
            PanelSpec("Score / threshold", "Drift statistic divided by its threshold: above 1 the view drifted.",
                      q(f"tuneloop_drift_score{{{T}}} / tuneloop_drift_threshold{{{T}}}", "{{task}} {{view}}")),
            PanelSpec("Task verdict", "Latest task verdict (any view over its threshold, Bonferroni across views).",
                      q(f"tuneloop_drift_detected{{{T}}}", "{{task}}"), mappings=ON_OFF),
        )),
        ("Windows and false alarms", (
            PanelSpec("Window size", "Captured prompts in the latest check's window.",
                      q(f"tuneloop_drift_window_prompts{{{T}}}", "{{task}}"), width=8),
            PanelSpec("False-alarm rate", "The configured false-alarm budget of the task verdict and the rate "
                      "measured on held-out no-drift windows at calibration.",
                      q(f"tuneloop_drift_false_alarm_rate{{{T}}}", "{{task}} {{kind}}"), unit="percentunit",
                      width=8),
            PanelSpec("Checks per hour by verdict", "Drift checks stored in the last hour, drifted or not.",
                      q(f"increase(tuneloop_drift_checks_total{{{T}}}[1h])", "{{task}} drifted={{drifted}}"),
                      width=8),
            PanelSpec("Latest Evidently report", "Id of each task's latest drift check with a saved Evidently "
                      "report; click to open it (the gateway serves it behind the admin token).",
                      q(f"tuneloop_drift_report_run_id{{{T}}}", "{{task}}"), "table", width=12,
                      link=("Open the Evidently report",
                            "${tuneloop_url}/reports/drift/${__data.fields.task}/drift-${__value.raw}.html")),
            PanelSpec("Last check age", "Time since each task's latest drift check.",
                      q(f"time() - tuneloop_drift_last_check_timestamp_seconds{{{T}}}", "{{task}}"), unit="s"),
        )),
    ),
)

SERVING = DashboardSpec(
    "tuneloop-serving", "tuneloop / Serving",
    "Per-adapter traffic, errors, latency and tokens from the gateway, vLLM's own engine metrics, and the "
    "traffic capture pipeline.",
    (
        ("Gateway", (
            PanelSpec("Requests per second by adapter", "Requests the gateway answered, per task and adapter "
                      "version (5m rate).", q(f"tuneloop:gateway_requests:rate5m{{{TA}}}",
                                              "{{task}} {{adapter}}"), unit="reqps", width=8),
            PanelSpec("Error ratio by adapter", "Share of requests answered with status >= 400 (5m).",
                      q(f"tuneloop:gateway_errors:ratio_rate5m{{{TA}}}", "{{task}} {{adapter}}"),
                      unit="percentunit", width=8),
            PanelSpec("Latency percentiles by adapter", "Gateway request latency, p50/p95/p99 over 5m.",
                      tuple(Query(f"tuneloop:gateway_latency_seconds:p{p}_5m{{{TA}}}", f"p{p} {{{{adapter}}}}")
                            for p in ("50", "95", "99")), unit="s", width=8),
            PanelSpec("Tokens per second (gateway)", "Prompt and completion tokens per second per adapter, as "
                      "vLLM counted them for the gateway's requests.",
                      (Query(f"sum by (task, adapter) (rate(tuneloop_gateway_completion_tokens_total{{{TA}}}[5m]))",
                             "{{adapter}} completion"),
                       Query(f"sum by (task, adapter) (rate(tuneloop_gateway_prompt_tokens_total{{{TA}}}[5m]))",
                             "{{adapter}} prompt")), unit="short", width=12),
            PanelSpec("Requests by status", "Requests per second by HTTP status (5m).",
                      q(f"sum by (status) (rate(tuneloop_gateway_requests_total{{{TA}}}[5m]))", "{{status}}"),
                      unit="reqps", width=12),
        )),
        ("vLLM", (
            PanelSpec("vLLM tokens per second", "Prompt and generated tokens per second from vLLM's own counters "
                      "(all adapters).",
                      (Query("sum(rate(vllm:generation_tokens_total[5m]))", "generated"),
                       Query("sum(rate(vllm:prompt_tokens_total[5m]))", "prompt")), width=8),
            PanelSpec("vLLM requests running and waiting", "Requests in vLLM's batch and in its queue.",
                      (Query("sum(vllm:num_requests_running)", "running"),
                       Query("sum(vllm:num_requests_waiting)", "waiting")), width=8),
            PanelSpec("vLLM time to first token p95", "95th percentile of vLLM's time to first token (5m).",
                      q("histogram_quantile(0.95, sum by (le) (rate(vllm:time_to_first_token_seconds_bucket[5m])))",
                        "p95"), unit="s", width=8),
            PanelSpec("vLLM end-to-end latency p95", "95th percentile of vLLM's end-to-end request latency (5m).",
                      q("histogram_quantile(0.95, sum by (le) (rate(vllm:e2e_request_latency_seconds_bucket[5m])))",
                        "p95"), unit="s", width=8),
            PanelSpec("vLLM KV cache usage", "Share of vLLM's KV cache in use.",
                      q("vllm:kv_cache_usage_perc", "{{model_name}}"), unit="percentunit", width=8),
            PanelSpec("LoRA adapters loaded", "Adapters loaded in vLLM, as the gateway's engine client knows them.",
                      q("tuneloop_engine_adapters_loaded", "loaded"), width=8),
        )),
        ("Engine and capture", (
            PanelSpec("Engine up", "1 while vLLM answers the gateway's health check.",
                      q("tuneloop_engine_up", "vLLM"), "stat", width=6, mappings=UP),
            PanelSpec("Engine restarts (1h)", "vLLM restarts by the gateway's supervisor in the last hour.",
                      q("increase(tuneloop_engine_restarts_total[1h])", "restarts"), width=6),
            PanelSpec("Capture queue depth", "Captured records waiting to be written to the database.",
                      q("tuneloop_capture_queue_depth", "queue"), width=6),
            PanelSpec("Capture outcomes", "Captured records per second by outcome: captured, spilled to disk, "
                      "replayed from the spill file, dropped.",
                      q("sum by (outcome) (rate(tuneloop_capture_records_total[5m]))", "{{outcome}}"), width=6),
        )),
    ),
    variables=("task", "adapter"),
)

RETRAINING = DashboardSpec(
    "tuneloop-retraining", "tuneloop / Retraining",
    "Retraining jobs by state, the stages of the latest job, and the gate's deltas that decided promotion.",
    (
        ("Jobs", (
            PanelSpec("Jobs by state", "Retraining jobs per task by current state.",
                      q(f"tuneloop_retrain_jobs{{{T}}}", "{{task}} {{state}}"), "table", width=8),
            PanelSpec("Stage durations (latest job)", "Seconds each stage of the task's latest retraining job "
                      "took: assemble, train, evaluate, promote.",
                      q(f"tuneloop_retrain_stage_seconds{{{T}}}", "{{task}} {{stage}}"), unit="s", width=8),
            PanelSpec("Retrains, promotions, rollbacks (1d)", "Jobs queued, adapters promoted and rollbacks in "
                      "the last day.",
                      (Query(f"increase(tuneloop_retrains_total{{{T}}}[1d])", "{{task}} retrains"),
                       Query(f"increase(tuneloop_promotions_total{{{T}}}[1d])", "{{task}} promotions"),
                       Query(f"increase(tuneloop_rollbacks_total{{{T}}}[1d])", "{{task}} rollbacks")), width=8),
        )),
        ("Gate", (
            PanelSpec("Gate deltas (latest decision)", "Candidate minus champion on the primary metric per gate set "
                      "in the latest decision: the point estimate and the paired CI bounds. Challenger sets need "
                      "the lower bound above 0, the held-out set above -margin.",
                      q(f"tuneloop_gate_delta{{{T}}}", "{{task}} {{dataset}} ({{role}}) {{bound}}"), "table",
                      width=12, decimals=3),
            PanelSpec("Latest gate decision", "1 promoted, 0 rejected.", q(f"tuneloop_gate_promoted{{{T}}}",
                                                                          "{{task}}"), "stat", width=6,
                      mappings=PROMOTED),
            PanelSpec("Failed jobs", "Retraining jobs that failed (crash, kill, error) in total.",
                      q(f"tuneloop_retrain_failures_total{{{T}}}", "{{task}}"), "stat", width=6),
            PanelSpec("Events per hour by kind", "tuneloop events (breaches, triggers, promotions, rollbacks, "
                      "watch results) in the last hour.",
                      q(f"sum by (kind) (increase(tuneloop_events_total{{{T}}}[1h]))", "{{kind}}"), width=24),
        )),
    ),
)

DASHBOARDS: tuple[DashboardSpec, ...] = (OVERVIEW, QUALITY, DRIFT, SERVING, RETRAINING)


def _variable(name: str) -> Any:
    if name == "task":
        query = "label_values(tuneloop_adapter_info, task)"
    elif name == "adapter":
        query = 'label_values(tuneloop_adapter_info{task=~"$task"}, adapter)'
    else:
        query = 'label_values(tuneloop_eval_score{task=~"$task"}, metric)'
    return (QueryVariable(name).label(name.capitalize()).datasource(DATASOURCE).query(query)
            .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED).sort(VariableSort.ALPHABETICAL_ASC)
            .multi(True).include_all(True).all_value(".*"))


def _panel(spec: PanelSpec) -> Any:
    kinds: dict[str, Any] = {"timeseries": timeseries.Panel, "stat": stat.Panel, "table": table.Panel}
    builder: Any = kinds[spec.kind]()
    builder = (builder.title(spec.title).description(spec.description).datasource(DATASOURCE)
               .unit(spec.unit).span(spec.width).height(spec.height))
    for index, query in enumerate(spec.queries):
        target = prometheus.Dataquery().expr(query.expr).ref_id(chr(ord("A") + index))
        if query.legend:
            target = target.legend_format(query.legend)
        if spec.kind == "table":
            target = target.instant().format("table")  # type: ignore[arg-type]
        builder = builder.with_target(target)
    if spec.decimals is not None:
        builder = builder.decimals(spec.decimals)
    if spec.mappings:
        builder = builder.mappings([ValueMap({value: ValueMappingResult(text=text, color=colour, index=i)
                                              for i, (value, (text, colour)) in enumerate(spec.mappings.items())})])
    if spec.link:
        builder = builder.data_links([DashboardLink(spec.link[0]).url(spec.link[1]).target_blank(True)])
    return builder


def build(spec: DashboardSpec) -> dict[str, Any]:
    """The dashboard as Grafana's JSON model (a plain dict, stable key order)."""
    dashboard = (Dashboard(spec.title).uid(spec.uid).description(spec.description).tags(TAGS)
                 .refresh("1m").time("now-24h", "now").timezone("browser").editable()
                 .with_variable(DatasourceVariable("datasource").label("Prometheus").type("prometheus")))
    for name in spec.variables:
        dashboard = dashboard.with_variable(_variable(name))
    if spec is DRIFT:
        dashboard = dashboard.with_variable(
            TextBoxVariable("tuneloop_url").label("tuneloop gateway URL").default_value("http://localhost:8000")
            .description("Base URL of the gateway that serves the saved drift reports."))
    for annotation in spec.annotations:
        dashboard = dashboard.annotation(
            AnnotationQuery().name(annotation.name).datasource(DATASOURCE).enable(True)
            .icon_color(annotation.colour).expr(annotation.expr))
    for other in DASHBOARDS:
        if other is not spec:
            dashboard = dashboard.link(DashboardLink(other.title).type(DashboardLinkType.LINK)
                                       .url(f"/d/{other.uid}").include_vars(True).keep_time(True))
    for row_title, panels in spec.rows:
        dashboard = dashboard.with_row(Row(row_title))
        for panel in panels:
            dashboard = dashboard.with_panel(_panel(panel))
    built: dict[str, Any] = json.loads(json.dumps(dashboard.build(), cls=JSONEncoder))
    return built


def render(spec: DashboardSpec) -> str:
    return json.dumps(build(spec), indent=2, sort_keys=True) + "\n"
