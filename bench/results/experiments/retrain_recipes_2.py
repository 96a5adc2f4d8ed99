"""Second experiment on the new bench workspace: champion sentiment@1 (30 steps), candidate @2 (from champion,
natural replay, 30 steps), control @3. Adds: fresh balanced (30 steps) and from-champion natural 60 steps."""
import os, sys, time, glob
sys.path.insert(0, "/work/main")
ws = sorted(glob.glob("/tmp/bench-retrain-*"), key=os.path.getmtime)[-1]
os.chdir(ws)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TUNELOOP_ADMIN_TOKEN", "exp")
from tuneloop.config import load_config
from tuneloop.store import Store
from tuneloop.registry import get_adapter
from challenger_sets.catalog import get_dataset
from challenger_sets.splits import evaluation_set
from retrain.data import assemble
from retrain.finetune import finetune
from evaluators.runner import EvalRunner, EvalTarget
from evaluators.compare import compare_runs
from serving.server import running_server
from evaluators.targets import ensure_served

config = load_config("tuneloop.yaml")
store = Store(config.resolved_database_url)
champion = get_adapter(store, "sentiment@1")
retrained = get_adapter(store, "sentiment@2")
control = get_adapter(store, "sentiment@3")
lr = retrained.card.hyperparameters["learning_rate"]; val = retrained.card.hyperparameters["validation_examples"]
steps = int(retrained.card.steps)
print(ws, "steps", steps, "lr", lr, flush=True)
models = [("champion", champion), ("from_champion_natural", retrained), ("control", control)]
config.tasks["sentiment"].retrain.balance_replay = True
data = assemble(config, store, "sentiment", challengers=["sentiment/other-topics"], name="retrain-exp-balanced")
t = time.time()
a = finetune(config, store, "sentiment", dataset=data.dataset.manifest.ref, max_steps=steps, progress=False,
             overrides={"learning_rate": lr, "validation_examples": val})
print("fresh balanced trained", a.ref, time.time() - t, flush=True)
models.append(("fresh_balanced", a))
t = time.time()
c = finetune(config, store, "sentiment", dataset="sentiment/retrain-job1@1", max_steps=2 * steps, progress=False,
             init_from=champion, overrides={"learning_rate": lr, "validation_examples": val})
print("from champion natural x2 trained", c.ref, time.time() - t, flush=True)
models.append(("from_champion_natural_2x", c))
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
            print(ds.manifest.ref, name, v.ref, {m: round(r.score(m).value, 3) for m in ("accuracy", "macro_f1")}, flush=True)
for ds in sets:
    for name, _ in models[1:]:
        c = compare_runs(runner, runs[("champion", ds.manifest.ref)], runs[(name, ds.manifest.ref)])
        for m in c.metrics:
            if m.metric != "exact_match":
                print(f"{ds.manifest.ref} {name}-champion {m.metric} {m.delta:+.3f} [{m.ci_low:+.3f},{m.ci_high:+.3f}] p={m.p_value:.3f}", flush=True)
