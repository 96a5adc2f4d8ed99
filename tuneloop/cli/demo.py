"""`tuneloop demo`: the whole loop on the embedded defaults, unattended, narrated.

sentiment is trained on airline tweets and served beside a chat adapter (multi-LoRA); traffic shifts to other
topics; labels arrive as feedback on the captured requests; the scheduled jobs (called here in the order the
scheduler would run them) find a quality breach and drift; the first incident starts a retraining job (a detached
worker process, as in production) and the second joins it; the gate compares candidate and champion on the same
examples (reusing the champion's scheduled runs); promotion hot-swaps the new champion; the watch re-checks it.
The Prometheus series are printed as they change.

Sizes (`DemoSizes`) keep the full demo under 20 minutes on two cores, with nothing else competing for the cores
while the retrain trains; `--fast` is a smoke run whose small sets mostly let the gate reject for lack of
evidence, which it says.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from typing import Annotated, Any

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_table
from tuneloop.config import Config


@dataclass(frozen=True)
class DemoSizes:
    sentiment_steps: int
    chat_steps: int
    retrain_steps: int
    validation_examples: int
    eval_every: int  # training steps between validation passes (each pass costs about a step)
    eval_limit: int  # examples per set in scheduled evals and in the gate
    margin: float  # gate's non-inferiority margin (and resolution) in macro-F1
    window: int  # captured prompts per drift window
    calibration_windows: int
    chat_eval: int


# The full demo's gate margin is 0.15 macro-F1 because 300 held-out tweets could not resolve less: `bench retrain`
# measured paired MDEs of 0.09-0.13 there (the gate refused at 0.1). The default margin, 0.1, uses all 1,000.
# 400 examples per set, not 300: three runs of this recipe moved other-topic macro-F1 by +0.061, +0.068 and
# +0.054 on 300 judged tweets, p = 0.027, 0.020 and 0.077; 400 resolve such an effect more often.
# 60 retrain steps at half the default replay: on the same 30-step champion, 30 steps at 1:1 replay moved
# other-topic macro-F1 by +0.033 (p = 0.12, n = 500), 60 steps at 1:1 by +0.066, 60 steps at 0.5 by +0.085
# [+0.038, +0.131] while airline accuracy rose by +0.098 (bench/results/experiments/retrain_recipes_{2,3}.log).
FULL = DemoSizes(sentiment_steps=30, chat_steps=6, retrain_steps=60, validation_examples=64, eval_every=20,
                 eval_limit=400, margin=0.15, window=60, calibration_windows=100, chat_eval=16)
FAST = DemoSizes(sentiment_steps=3, chat_steps=2, retrain_steps=3, validation_examples=8, eval_every=10,
                 eval_limit=40, margin=0.15, window=30, calibration_windows=20, chat_eval=4)
DEMO_REPLAY_RATIO = 0.5  # airline tweets replayed per new example (default 1.0); see FULL's comment
EVAL_CONCURRENCY = 16  # `bench eval`: 16 requests in flight keep vLLM's batches full on two cores
SENTIMENT_LEARNING_RATE = 1e-3  # as in `bench labels`: 40 steps at the recipe's 2e-4 barely move the adapter
SERIES = ("tuneloop_eval_score", "tuneloop_drift_detected", "tuneloop_incidents_open", "tuneloop_retrains_total",
          "tuneloop_promotions_total", "tuneloop_rollbacks_total", "tuneloop_champion_version")


def demo(
    fast: Annotated[bool, typer.Option("--fast", help="Few training steps and small sets (a smoke run).")] = False,
) -> None:
    """Run the whole loop: train, serve, drift, incident, feedback, retrain, gate, promote, watch."""
    sizes = FAST if fast else FULL
    started = time.perf_counter()
    if not os.environ.get("TUNELOOP_ADMIN_TOKEN") and not STATE.config.serving.admin_token:
        # The retraining worker promotes through the gateway's admin API; a demo-only token keeps it closed.
        os.environ["TUNELOOP_ADMIN_TOKEN"] = secrets.token_hex(16)
    STATE._config = demo_config(STATE.config, sizes)
    config = STATE.config
    _train_champions(config, sizes)
    from tuneloop.serving.server import running_server

    with running_server(config, STATE.store) as running:
        console.rule("3. serve: vLLM + gateway, one base model, two LoRA adapters")
        console.print(f"gateway {running.url}, vLLM {running.engine.spec.base_url}; "
                      f"served: {', '.join(sorted(running.engine.client.loaded))}")
        _multi_lora_requests(running.url)
        _chat_vs_base(config, running.url, sizes)
        _story(config, running.url, sizes, running)
    console.rule(f"done in {time.perf_counter() - started:.0f} s")


def demo_config(config: Config, sizes: DemoSizes) -> Config:
    raw = config.model_dump(mode="json")
    raw["monitor"].update(window=sizes.window, calibration_windows=sizes.calibration_windows)
    raw["evaluation"]["concurrency"] = max(raw["evaluation"]["concurrency"], EVAL_CONCURRENCY)
    for name in ("sentiment", "chat"):
        task = raw["tasks"].get(name)
        if task is None:
            continue
        task["train"].update(validation_examples=sizes.validation_examples, eval_every=sizes.eval_every)
        if name == "sentiment":
            task["train"]["learning_rate"] = SENTIMENT_LEARNING_RATE
        task["schedule"]["eval_limit"] = sizes.eval_limit
        task["retrain"].update(max_steps=sizes.retrain_steps)
        if name == "sentiment":
            task["retrain"]["replay_ratio"] = DEMO_REPLAY_RATIO
        task["retrain"]["gate"].update(limit=sizes.eval_limit, margin=sizes.margin)
    updated = Config.model_validate(raw)
    updated.config_dir = config.config_dir
    return updated


def _train_champions(config: Config, sizes: DemoSizes) -> None:
    from tuneloop.retrain.finetune import finetune
    from tuneloop.serving.promotion import promote
    from tuneloop.basemodel import ensure_base_model

    console.rule("1. base model and datasets")
    base = ensure_base_model(config)
    console.print(f"{base.name} at {base.path} (sha256 {base.sha256[:12]})")
    for task, steps in (("sentiment", sizes.sentiment_steps), ("chat", sizes.chat_steps)):
        t = config.task(task)
        console.rule(f"2. fine-tune {task} on {t.train_dataset} (LoRA r={t.train.rank}, {steps} steps)")
        version = finetune(config, STATE.store, task, max_steps=steps)
        if "champion" not in version.aliases:
            promote(config, STATE.store, version.ref)  # a rerun of the demo starts from its own fresh adapter
        card = version.card
        console.print(f"registered {version.ref} (champion): train loss {card.curve[0].train_loss} -> "
                      f"{card.curve[-1].train_loss}, val loss {card.best_val_loss}")


def _ask(url: str, model: str, text: str, max_tokens: int = 24) -> tuple[str, dict[str, Any]]:
    import httpx

    body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": max_tokens,
            "temperature": 0}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
    response.raise_for_status()
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


def _story(config: Config, url: str, sizes: DemoSizes, running: Any) -> None:
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.challenger_sets.from_traffic import build_from_traffic
    from tuneloop.challenger_sets.splits import split
    from tuneloop.monitor.service import after_job, drift_runner, eval_runner
    from tuneloop.retrain.jobs import JobStore
    from tuneloop.cli.retrain import follow, show_job

    task = config.task("sentiment")
    console.rule("4. baseline: the airline champion on its held-out set (no other-topic traffic exists yet)")
    eval_job, drift_job = eval_runner(config, STATE.store), drift_runner(config, STATE.store)
    _heldout_baseline(config, url, sizes)
    _series(url, "baseline")

    console.rule("5. traffic shifts from airline tweets to other topics; drift checks every window, one scheduled eval")
    airline = get_dataset(STATE.store, task.heldout_dataset).load()[-sizes.window:]
    trainable, _ = split(get_dataset(STATE.store, task.challenger_datasets[0]).load(), task.retrain.judge_share,
                         task.retrain.seed)
    shifted = trainable[:3 * sizes.window]
    sent = _send(url, [e.input_text() for e in airline], concurrency=8)
    time.sleep(1.5)  # the capture writer flushes within a second
    result = drift_job("sentiment")
    after_job(config, STATE.store, "drift", "sentiment")
    console.print(f"{len(sent)} airline tweets; drift check: {'DRIFT' if result.get('drifted') else 'quiet'} "
                  f"(run {result.get('run_id')})")
    labelled: dict[str, str] = {}
    for window in range(3):
        batch = shifted[window * sizes.window:(window + 1) * sizes.window]
        ids = _send(url, [e.input_text() for e in batch], concurrency=8)
        labelled.update({request_id: e.reference for request_id, e in zip(ids, batch, strict=True)})
        time.sleep(1.5)
        if window == 1:
            _feedback(url, labelled)
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
            _eval_table(config, eval_job("sentiment"))
            after_job(config, STATE.store, "eval", "sentiment")
        result = drift_job("sentiment")
        after_job(config, STATE.store, "drift", "sentiment")
        console.print(f"{len(ids)} other-topic tweets; drift check: {'DRIFT' if result.get('drifted') else 'quiet'} "
                      f"(run {result.get('run_id')}, {task.policy.drift_windows} drifted in a row open an incident)")

    console.rule("6. incidents -> one retraining job (a second incident joins the running job)")
    _incidents()
    jobs = JobStore(STATE.store).recent(task="sentiment", limit=1)
    if not jobs:
        console.print("no retraining job was started (no incident opened); the demo ends here")
        return
    job = jobs[0]
    console.print(f"job {job.id}: triggers {[t.reason for t in job.triggers]}")
    _series(url, "detected")

    console.rule(f"7. retraining job {job.id}: assemble -> train -> gate -> promote (worker process, log "
                 f"{job.log_path or 'starting'})")
    follow(job.id)
    show_job(job.id)
    final = JobStore(STATE.store).get(job.id)
    if final.dataset_ref:
        recipe = get_dataset(STATE.store, final.dataset_ref).manifest.build
        console.print(f"training set {final.dataset_ref}: {recipe['rows']} rows = {recipe['new']['unique']} new "
                      f"(labels {recipe['new']['labels']}) + {recipe['replay']['rows']} replayed airline tweets; "
                      f"{sum(s.get('held_back_for_gate', 0) for s in recipe['new']['sources'].values())} challenger "
                      "examples held back for the gate, never trained on")

    console.rule("8. after the decision")
    if final.state == "promoted":
        console.print(f"sentiment now routes to sentiment@{final.candidate_version} (hot-swapped, no restart): "
                      f"{_ask(url, 'sentiment', 'Coachella lineup this year is incredible!!')[1]['model']}")
        _eval_table(config, eval_job("sentiment"))
        after_job(config, STATE.store, "eval", "sentiment")
        watched = JobStore(STATE.store).get(job.id).watch
        console.print(f"watch: {watched.get('status')} until {watched.get('until')}; signals: "
                      + "; ".join(s["message"] for s in watched.get("signals", [])), markup=False)
    else:
        console.print(f"job {job.id} {final.state}: the airline champion keeps serving. "
                      + "; ".join(final.decision.get("reasons", [])) + (f" {final.error}" if final.error else ""),
                      markup=False)
    _series(url, "end")


def _send(url: str, texts: list[str], *, concurrency: int) -> list[str]:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(concurrency) as pool:
        return [request_id for request_id, _ in pool.map(lambda t: _ask(url, "sentiment", t, 4), texts)]


def _feedback(url: str, labelled: dict[str, str]) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=30) as http:
        for request_id, reference in labelled.items():
            http.post("/v1/feedback", json={"request_id": request_id, "reference": reference}).raise_for_status()


def _minutes_ago(minutes: int) -> Any:
    from datetime import UTC, datetime, timedelta

    return datetime.now(UTC) - timedelta(minutes=minutes)


def _heldout_baseline(config: Config, url: str, sizes: DemoSizes) -> None:
    from tuneloop.challenger_sets.catalog import get_dataset
    from tuneloop.evaluators.runner import EvalRunner, EvalTarget
    from tuneloop.registry import find_alias

    champion = find_alias(STATE.store, "sentiment", "champion")
    assert champion is not None
    dataset = get_dataset(STATE.store, config.task("sentiment").heldout_dataset)
    report = EvalRunner(config, STATE.store, progress=False).run(
        EvalTarget("sentiment", champion.ref, champion.version, url), dataset, limit=sizes.eval_limit)
    _eval_table(config, {"adapter": champion.ref, "runs": {dataset.manifest.ref: report.run_id}})


def _eval_table(config: Config, result: dict[str, Any]) -> None:
    from tuneloop.evaluators.runs import RunStore

    runs = RunStore(STATE.store)
    metric = config.task("sentiment").primary_metric
    rows = []
    for dataset, run_id in result.get("runs", {}).items():
        report = runs.report(runs.get(run_id), reused=True)
        score = next((s for s in report.scores if s.metric == metric), None)
        if score is not None:
            rows.append([dataset, report.n, f"{score.value:.3f} [{score.ci_low:.3f}, {score.ci_high:.3f}]"])
    print_table(f"scheduled eval of {result.get('adapter')}: {metric} (95 % CI)", ["dataset", "n", metric], rows)


def _incidents() -> None:
    from tuneloop.monitor.policy import list_incidents

    print_table("open incidents", ["id", "rule", "message"],
                [[i.id, i.rule, i.detail.get("message", "")] for i in list_incidents(STATE.store, task="sentiment")])


def _series(url: str, when: str) -> None:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=30).text
    lines = [line for line in text.splitlines() if line.startswith(SERIES) and 'task="sentiment"' in line
             and ('metric="macro_f1"' in line or "tuneloop_eval_score" not in line)]
    console.print(f"[bold]Prometheus ({when})[/bold]")
    for line in lines[:14]:
        console.print(f"  {line}", markup=False, soft_wrap=True)
