"""Recipe selection on the validation split (never the test set): train for a wall budget, score validation."""
import json, sys, tempfile, time
from pathlib import Path
sys.path.insert(0, ".")
import torch
from bench.setup import base_model_path, sentiment_sets
from tuneloop.config import Config
from tuneloop.evaluators.label_likelihood import predict_labels
from tuneloop.evaluators.scoring import score_examples
from tuneloop.retrain.finetune import split_validation
from tuneloop.retrain.trainer import fit

lr, max_steps, budget_min = float(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}
task = Config().tasks["sentiment"]
recipe = task.train.model_copy(update={"learning_rate": lr, "max_steps": max_steps, **extra})
train, validation = split_validation(sentiment_sets()["train"], recipe.validation_examples, recipe.seed)
base = base_model_path()
t0 = time.time()
with tempfile.TemporaryDirectory() as tmp:
    result = fit(base, train, validation, system_prompt=task.system_prompt, train=recipe, output_dir=Path(tmp) / "a",
                 progress=False, on_step=lambda info: info.elapsed_s >= budget_min * 60)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from peft import PeftModel
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), Path(tmp) / "a")
    preds = predict_labels(model, AutoTokenizer.from_pretrained(base), validation, system_prompt=task.system_prompt, labels=task.labels)
    acc = score_examples(["accuracy", "macro_f1"], preds, [e.reference for e in validation], task.labels)
    from tuneloop.evaluators.statistics import table_interval
    a, _ = table_interval(acc["accuracy"]); m, _ = table_interval(acc["macro_f1"])
print(json.dumps({"lr": lr, "max_steps": max_steps, "budget": budget_min, "extra": extra, "steps": result.steps,
                  "stopped_early": result.stopped_early, "best_val_loss": result.best_val_loss,
                  "val_acc": round(a.value, 3), "val_f1": round(m.value, 3), "tok_s": round(result.tokens_per_second),
                  "wall": round(time.time() - t0)}), flush=True)
