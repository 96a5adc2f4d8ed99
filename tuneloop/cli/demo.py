"""`tuneloop demo`: the whole loop on the embedded defaults, unattended, narrated.

sentiment is trained on airline tweets and served beside a chat adapter (multi-LoRA); traffic shifts to other
topics; labels arrive as feedback on the captured requests; the scheduled jobs (run through the conductor, in the
order the scheduler would run them) find a quality breach and drift; the first incident starts a retraining job
(a detached worker process, as in production) and the second joins it; the gate compares candidate and champion
on the same examples (reusing the champion's scheduled runs); promotion hot-swaps the new champion; the watch
re-checks it. The Prometheus series are printed as they change. Sizes and every decision behind them are in
tuneloop/conductor/demo.py; this module sends the simulated traffic and prints.
"""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_json, print_table
from tuneloop.conductor.demo import FAST, FULL, DemoSizes, demo_config, train_champion
from tuneloop.config import Config
from tuneloop.errors import TuneloopError

if TYPE_CHECKING:
    from tuneloop.conductor.process import RunningLoop
    from tuneloop.monitor.jobs import EvalJobResult, JobOutcome
    from tuneloop.retrain.records import Job

class DemoRequestFailed(TuneloopError):
    """A request the demo sent as a user was not answered."""


SERIES = ("tuneloop_eval_score", "tuneloop_drift_detected", "tuneloop_incidents_open", "tuneloop_retrains_total",
          "tuneloop_promotions_total", "tuneloop_rollbacks_total", "tuneloop_champion_version")


def demo(
    fast: Annotated[bool, typer.Option("--fast", help="Few training steps and small sets (a smoke run).")] = False,
    json_output: Annotated[bool, typer.Option("--json", help="Narrate on stderr; print the retraining job it "
                                              "ended with as JSON on stdout.")] = False,
) -> None:
    """Run the whole loop: train, serve, drift, incident, feedback, retrain, gate, promote, watch."""
    from tuneloop.conductor.process import running

    sizes = FAST if fast else FULL
    if json_output:
        console.file = sys.stderr
    started = time.perf_counter()
    STATE.use_config(demo_config(STATE.config, sizes))
    config = STATE.config
    _train_champions(config, sizes)
    with running(config, STATE.store) as stack:
        console.rule("3. serve: vLLM + gateway, one base model, two LoRA adapters")
        console.print(f"gateway {stack.url}, vLLM {stack.server.engine.base_url}; "
                      f"served: {', '.join(sorted(stack.server.engine.client.loaded))}")
        _multi_lora_requests(stack.url)
        _chat_vs_base(config, stack.url, sizes)
        job = _story(config, stack, sizes)
    seconds = time.perf_counter() - started
    console.rule(f"done in {seconds:.0f} s")
    if json_output:
        print_json({"seconds": round(seconds, 1), "fast": fast,
                    "job": job.model_dump(mode="json") if job is not None else None})


def _train_champions(config: Config, sizes: DemoSizes) -> None:
    from tuneloop.basemodel import ensure_base_model

    console.rule("1. base model and datasets")
    base = ensure_base_model(config)
    console.print(f"{base.name} at {base.path} (sha256 {base.sha256[:12]})")
    for task, steps in (("sentiment", sizes.sentiment_steps), ("chat", sizes.chat_steps)):
        t = config.task(task)
        console.rule(f"2. fine-tune {task} on {t.train_dataset} (LoRA r={t.train.rank}, {steps} steps)")
        version = train_champion(config, STATE.store, task, steps=steps)
        card = version.card
        console.print(f"registered {version.ref} (champion): train loss {card.curve[0].train_loss} -> "
                      f"{card.curve[-1].train_loss}, val loss {card.best_val_loss}")


def _ask(url: str, model: str, text: str, max_tokens: int = 24) -> tuple[str, dict[str, Any]]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    if response.status_code != 200:
        raise DemoRequestFailed(f"the gateway answered {response.status_code} to a {model} request: "
                                f"{response.text[:300]}")
    return response.headers["X-Request-Id"], response.json()


def _multi_lora_requests(url: str) -> None:
    for model, text in [("sentiment", "@united lost my bag AGAIN. Call me at +1 415 555 0199"),
                        ("chat", "hey! what did you do this weekend?")]:
        _, reply = _ask(url, model, text)
        console.print(f"  {model:>9} <- {text!r}\n            -> ({reply['model']}) "
                      f"{reply['choices'][0]['message']['content']!r}", markup=False)


def _chat_vs_base(config: Config, url: str, sizes: DemoSizes) -> None:
    """chat's champion against the base model on held-out replies, and what that means, in plain words."""
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.evaluators.compare import compare_runs
    from tuneloop.evaluators.runner import EvalRunner, EvalTarget
    from tuneloop.registry import find_alias

    champion = find_alias(STATE.store, "chat", "champion")
    if champion is None:
        return
    runner = EvalRunner(config, STATE.store, progress=False)
    dataset = get_dataset(STATE.store, config.task("chat").heldout_dataset)
    base = runner.run(EvalTarget("chat", config.base_model.name, None, url), dataset, limit=sizes.chat_eval)
    tuned = runner.run(EvalTarget("chat", champion.ref, champion.version, url), dataset, limit=sizes.chat_eval)
    report = compare_runs(runner, base.run_id, tuned.run_id)
    chrf = next(m for m in report.metrics if m.metric == "chrf")
    console.print(f"chat: {champion.ref} vs base model on {dataset.manifest.ref}, n={report.n}: chrF "
                  f"{chrf.a:.3f} -> {chrf.b:.3f}, delta {chrf.delta:+.3f} [{chrf.ci_low:+.3f}, {chrf.ci_high:+.3f}], "
                  f"p={chrf.p_value:.3f}")
    if chrf.significant and chrf.delta < 0:
        console.print(f"  plainly: {champion.ref} ({champion.card.steps} steps) is WORSE than the base model here. It "
                      "is served only to show several adapters on one engine; it became champion because it is the "
                      "task's first adapter, not because a gate passed it, and the loop below never promotes "
                      "without one.")
    elif not chrf.significant:
        console.print(f"  plainly: n={report.n} cannot tell {champion.ref} from the base model (MDE {chrf.mde:.3f}); "
                      "it is served to show several adapters on one engine, not because it was shown better.")


def _story(config: Config, stack: RunningLoop, sizes: DemoSizes) -> Job | None:
    """The traffic shift and what the loop does about it; the retraining job it ends with, if one started."""
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.challenger_sets.from_traffic import build_from_traffic
    from tuneloop.challenger_sets.splits import split
    from tuneloop.cli.retrain import follow_job, show_job
    from tuneloop.retrain.data import RetrainRecipe
    from tuneloop.retrain.jobs import JobStore

    url, loop, task = stack.url, stack.loop, config.task("sentiment")
    console.rule("4. baseline: the airline champion on its held-out set (no other-topic traffic exists yet)")
    _heldout_baseline(config, url, sizes)
    _series(url, "baseline")

    console.rule("5. traffic shifts from airline tweets to other topics; drift checks every window, one scheduled eval")
    airline = get_dataset(STATE.store, task.heldout_dataset).load()[-sizes.window:]
    trainable, _ = split(get_dataset(STATE.store, task.challenger_datasets[0]).load(), task.retrain.judge_share,
                         task.retrain.seed)
    shifted = trainable[:3 * sizes.window]
    sent = _send(url, [e.input_text() for e in airline], concurrency=8)
    time.sleep(1.5)  # the capture writer flushes within a second
    console.print(f"{len(sent)} airline tweets; drift check: {_drift(loop.run_scheduled('drift', 'sentiment'))}")
    labelled: dict[str, str] = {}
    for window in range(3):
        batch = shifted[window * sizes.window:(window + 1) * sizes.window]
        ids = _send(url, [e.input_text() for e in batch], concurrency=8)
        labelled.update({request_id: e.reference for request_id, e in zip(ids, batch, strict=True)})
        time.sleep(1.5)
        if window == 1:
            _feedback(url, labelled, config.admin_token)
            built = build_from_traffic(config, STATE.store, "sentiment", name="feedback",
                                       since=_minutes_ago(60))
            console.print(f"labels arrive: {len(labelled)} captured requests got their reference via POST "
                          f"/v1/feedback -> `datasets from-traffic` built {built.dataset.manifest.ref} "
                          f"({built.dataset.manifest.rows} rows)")
        if window == 2:
            # The scheduled eval runs on its own clock; here it falls before the last drift check, so the job its
            # breach starts does not share the two cores with the eval or with the drifted traffic.
            console.print("[bold]the scheduled eval[/bold] (the champion on its held-out set and the new topics' "
                          "judge split; the half a retrain may train on is never judged)")
            _eval_table(config, loop.run_scheduled("eval", "sentiment"))
        console.print(f"{len(ids)} other-topic tweets; drift check: {_drift(loop.run_scheduled('drift', 'sentiment'))}"
                      f" ({task.policy.drift_windows} drifted in a row open an incident)")
        _estimates()

    console.rule("6. incidents -> one retraining job (later incidents join the running job)")
    _incidents()
    jobs = JobStore(STATE.store).recent(task="sentiment", limit=1)
    if not jobs:
        console.print("no retraining job was started (no incident opened); the demo ends here")
        return None
    job = jobs[0]
    console.print(f"job {job.id}: triggers {[t.trigger.reason for t in job.triggers]}")
    _series(url, "detected")

    console.rule(f"7. retraining job {job.id}: assemble -> train -> gate -> promote (worker process, log "
                 f"{job.log_path or 'starting'})")
    final = follow_job(job.id)
    show_job(job.id)
    if final.dataset_ref:
        recipe = RetrainRecipe.of(get_dataset(STATE.store, final.dataset_ref))
        console.print(f"training set {final.dataset_ref}: {recipe.rows} rows = {recipe.new.unique} new "
                      f"(labels {recipe.new.labels}) + {recipe.replay.rows} replayed airline tweets; "
                      f"{recipe.new.held_back_for_gate} challenger examples held back for the gate, never trained on")

    console.rule("8. after the decision")
    if final.state == "promoted":
        console.print(f"sentiment now routes to {final.candidate_ref} (hot-swapped, no restart): "
                      f"{_ask(url, 'sentiment', 'Coachella lineup this year is incredible!!')[1]['model']}")
        _eval_table(config, loop.run_scheduled("eval", "sentiment"))  # the watch checks the promotion after it
        watched = JobStore(STATE.store).get(job.id).watch
        if watched is not None:
            console.print(f"watch: {watched.status} until {watched.until:%Y-%m-%d %H:%M:%S}; signals: "
                          + "; ".join(s.message for s in watched.signals), markup=False)
    else:
        reasons = final.decision.reasons if final.decision else []
        console.print(f"job {job.id} {final.state}: the airline champion keeps serving. " + "; ".join(reasons)
                      + (f" {final.error}" if final.error else ""), markup=False)
    _series(url, "end")
    return JobStore(STATE.store).get(job.id)


def _drift(outcome: JobOutcome) -> str:
    from tuneloop.monitor.jobs import DriftJobResult

    if isinstance(outcome.result, DriftJobResult):
        return f"{'DRIFT' if outcome.result.drifted else 'quiet'} (run {outcome.result.run_id})"
    return outcome.error or f"skipped: {getattr(outcome.result, 'reason', '')}"


def _send(url: str, texts: list[str], *, concurrency: int) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        return [request_id for request_id, _ in pool.map(lambda t: _ask(url, "sentiment", t, 4), texts)]


def _feedback(url: str, labelled: dict[str, str], token: str | None) -> None:
    """Label requests as a team's labelling tool would, with a credential of the feedback scope (the demo's admin
    token holds every scope)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with httpx.Client(base_url=url, timeout=30, headers=headers) as http:
        for request_id, reference in labelled.items():
            http.post("/v1/feedback", json={"request_id": request_id, "reference": reference}).raise_for_status()


def _minutes_ago(minutes: int) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(minutes=minutes)


def _heldout_baseline(config: Config, url: str, sizes: DemoSizes) -> None:
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.evaluators.runner import EvalRunner, EvalTarget
    from tuneloop.monitor.jobs import EvalJobResult
    from tuneloop.registry import find_alias

    champion = find_alias(STATE.store, "sentiment", "champion")
    assert champion is not None, "the demo trained one"
    dataset = get_dataset(STATE.store, config.task("sentiment").heldout_dataset)
    report = EvalRunner(config, STATE.store, progress=False).run(
        EvalTarget("sentiment", champion.ref, champion.version, url), dataset, limit=sizes.eval_limit)
    assert report.run_id is not None
    _print_eval(config, EvalJobResult(adapter=champion.ref, runs={dataset.manifest.ref: report.run_id}))


def _eval_table(config: Config, outcome: JobOutcome) -> None:
    from tuneloop.monitor.jobs import EvalJobResult

    if not isinstance(outcome.result, EvalJobResult):
        console.print(f"scheduled eval: {outcome.error or outcome.result}", markup=False)
        return
    _print_eval(config, outcome.result)


def _print_eval(config: Config, result: EvalJobResult) -> None:
    from tuneloop.evaluators.runs import RunStore

    runs = RunStore(STATE.store)
    metric = config.task("sentiment").primary_metric
    rows = []
    for dataset, run_id in result.runs.items():
        report = runs.report(runs.get(run_id), reused=True)
        score = next((s for s in report.scores if s.metric == metric), None)
        if score is not None:
            rows.append([dataset, report.n, f"{score.value:.3f} [{score.ci_low:.3f}, {score.ci_high:.3f}]"])
    print_table(f"scheduled eval of {result.adapter}: {metric} (95 % CI)", ["dataset", "n", metric], rows)


def _estimates() -> None:
    """The live-traffic estimates the drift job just made (monitor/estimate.py), beside what drift says."""
    from sqlalchemy import select

    from tuneloop.tables import QualityEstimateRow

    with STATE.store.session() as session:
        rows = session.scalars(select(QualityEstimateRow).where(QualityEstimateRow.task == "sentiment")
                               .order_by(QualityEstimateRow.id.desc()).limit(3)).all()
    if not rows:
        console.print("live-traffic estimate: none yet (no captured answers with a signal)")
        return
    shown = [f"{r.method} {r.value:.3f} [{r.ci_lower:.3f}, {r.ci_upper:.3f}]" if r.value is not None
             and r.ci_lower is not None and r.ci_upper is not None else f"{r.method} - (no labels)"
             for r in reversed(rows)]
    console.print(f"live-traffic estimate of {rows[0].metric} over the last {rows[0].window} answers "
                  f"({rows[0].n_labelled} labelled): " + "; ".join(shown))


def _incidents() -> None:
    from tuneloop.monitor.incidents import IncidentStore

    print_table("open incidents", ["id", "rule", "message"],
                [[i.id, str(i.rule), i.message] for i in IncidentStore(STATE.store).list(task="sentiment")])


def _series(url: str, when: str) -> None:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith(SERIES) and 'task="sentiment"' in line
             and ('metric="macro_f1"' in line or "tuneloop_eval_score" not in line)]
    console.print(f"[bold]Prometheus ({when})[/bold]")
    for line in lines[:14]:
        console.print(f"  {line}", markup=False, soft_wrap=True)
