"""Third experiment on the workspace of experiment 2 (champion sentiment@1, 30 steps): 60 steps from the champion
with half the replay (replay_ratio 0.5) instead of 1:1, to see whether more new-data steps lift other topics further
without costing airline accuracy. Champion runs on the first 500 examples are reused from experiment 2."""
import glob
import os
import sys
import time

sys.path.insert(0, "/work/main")
ws = "/tmp/bench-retrain-56uot30f"
os.chdir(ws)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TUNELOOP_ADMIN_TOKEN", "exp")
from challenger_sets.catalog import get_dataset
from challenger_sets.splits import evaluation_set
from evaluators.compare import compare_runs
from evaluators.runner import EvalRunner, EvalTarget
from evaluators.targets import ensure_served
from retrain.data import assemble
from retrain.finetune import finetune
from serving.server import running_server
from tuneloop.config import load_config
from tuneloop.registry import get_adapter
from tuneloop.store import Store

config = load_config("tuneloop.yaml")
store = Store(config.resolved_database_url)
champion = get_adapter(store, "sentiment@1")
retrained = get_adapter(store, "sentiment@2")
lr = retrained.card.hyperparameters["learning_rate"]
val = retrained.card.hyperparameters["validation_examples"]
steps = 2 * int(retrained.card.steps)
print(ws, "steps", steps, "lr", lr, flush=True)
config.tasks["sentiment"].retrain.replay_ratio = 0.5
data = assemble(config, store, "sentiment", challengers=["sentiment/other-topics"], name="retrain-exp-replay05")
print("assembled", data.dataset.manifest.ref, data.recipe["rows"], data.recipe["new"]["labels"],
      data.recipe["replay"]["labels"], flush=True)
t = time.time()
candidate = finetune(config, store, "sentiment", dataset=data.dataset.manifest.ref, max_steps=steps, progress=False,
                     init_from=champion, overrides={"learning_rate": lr, "validation_examples": val})
print("from champion replay 0.5 x2 trained", candidate.ref, time.time() - t, flush=True)
models = [("champion", champion), ("from_champion_replay05_2x", candidate)]
task = config.task("sentiment")
sets = [get_dataset(store, task.heldout_dataset),
        get_dataset(store, evaluation_set(store, "sentiment", task.challenger_datasets[0]))]
runs = {}
with running_server(config, store, seed=0) as running:
    runner = EvalRunner(config, store, progress=False)
    for ds in sets:
        for name, v in models:
            ensure_served(config, v)
            r = runner.run(EvalTarget("sentiment", v.ref, v.version, running.url), ds, limit=500)
            runs[(name, ds.manifest.ref)] = r.run_id
            print(ds.manifest.ref, name, v.ref, {m: round(r.score(m).value, 3) for m in ("accuracy", "macro_f1")},
                  "reused" if r.reused else "", flush=True)
for ds in sets:
    c = compare_runs(runner, runs[("champion", ds.manifest.ref)], runs[("from_champion_replay05_2x", ds.manifest.ref)])
    for m in c.metrics:
        if m.metric != "exact_match":
            print(f"{ds.manifest.ref} replay05_2x-champion {m.metric} {m.delta:+.3f} [{m.ci_low:+.3f},{m.ci_high:+.3f}] "
                  f"p={m.p_value:.3f}", flush=True)
