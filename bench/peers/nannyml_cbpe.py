"""NannyML's CBPE on probabilities we hand it: run with the NannyML environment's Python (`make bench-peers`).

Reads JSON from argv[1]: {"labels": [...], "window": N, "reference": {"probs", "predicted", "truth"},
"analysis": {"probs", "predicted"}}, the analysis rows being consecutive windows of N. Writes JSON to argv[2]:
per metric, each chunk's estimated value and NannyML's sampling error. The probabilities are already calibrated
(by tuneloop, on the same reference), so NannyML is told not to calibrate again: the comparison is of the
estimators, on the same inputs.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import nannyml as nml
import pandas as pd
from nannyml.calibration import NoopCalibrator


def frame(labels: list[str], part: dict[str, Any], with_truth: bool) -> pd.DataFrame:
    data = {f"p_{label}": [row[i] for row in part["probs"]] for i, label in enumerate(labels)}
    data["y_pred"] = [labels[i] for i in part["predicted"]]
    if with_truth:
        data["y_true"] = [labels[i] for i in part["truth"]]
    return pd.DataFrame(data)


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    labels = request["labels"]
    estimator = nml.CBPE(y_pred_proba={label: f"p_{label}" for label in labels}, y_pred="y_pred", y_true="y_true",
                         problem_type="classification_multiclass", metrics=["accuracy", "f1"],
                         chunk_size=request["window"], calibrator=NoopCalibrator())
    estimator.fit(frame(labels, request["reference"], True))
    result = estimator.estimate(frame(labels, request["analysis"], False)).filter(period="analysis").to_df()
    out: dict[str, Any] = {}
    for metric, name in (("accuracy", "accuracy"), ("f1", "macro_f1")):
        out[name] = {"value": result[(metric, "value")].tolist(),
                     "sampling_error": result[(metric, "sampling_error")].tolist()}
    out["version"] = nml.__version__
    Path(sys.argv[2]).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
