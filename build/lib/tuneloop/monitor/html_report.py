"""The human drift report: an Evidently HTML page, with captured text kept as data.

Evidently 0.7 writes the report's data as `json.dumps` output inside a `<script>` block, so a captured prompt
containing `</script><script>...` ends the block and runs as code in whoever opens the report (measured: the raw
string appears verbatim in the saved HTML). We render through Evidently's own template but with JSON whose `<`, `>`
and `&` are written as \\u escapes, which JavaScript reads back as the same characters: the page shows the text,
the browser never parses it as markup.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

_RENDER_LOCK = threading.Lock()
KEEP_REPORTS = 20


class _ScriptSafeJson:
    """Stands in for the `json` module inside Evidently's template module while it renders."""

    def __getattr__(self, name: str) -> Any:
        return getattr(json, name)

    @staticmethod
    def dumps(obj: Any, **kwargs: Any) -> str:
        text = json.dumps(obj, **kwargs)
        return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_drift_html(reference_texts: Sequence[str], current_texts: Sequence[str]) -> str:
    """Evidently's text drift and descriptor drift for the window, as one self-contained HTML page."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    import pandas as pd
    from evidently import DataDefinition, Dataset, Report
    from evidently.descriptors import NonLetterCharacterPercentage, TextLength, WordCount
    from evidently.legacy.utils import dashboard
    from evidently.metrics import ValueDrift

    def dataset(texts: Sequence[str]) -> Any:
        return Dataset.from_pandas(
            pd.DataFrame({"prompt": list(texts)}), data_definition=DataDefinition(text_columns=["prompt"]),
            descriptors=[TextLength("prompt", alias="length_chars"), WordCount("prompt", alias="word_count"),
                         NonLetterCharacterPercentage("prompt", alias="non_letter_percent")])

    report = Report([ValueDrift(column=c) for c in ("prompt", "length_chars", "word_count", "non_letter_percent")],
                    include_tests=True)
    snapshot = report.run(dataset(current_texts), dataset(reference_texts))
    with _RENDER_LOCK:
        original = dashboard.json
        dashboard.json = _ScriptSafeJson()
        try:
            return str(snapshot.get_html_str(as_iframe=False))
        finally:
            dashboard.json = original


def save_report(html: str, folder: Path, name: str) -> Path:
    """Write atomically and keep only the newest reports of the folder (each is ~4 MB with Evidently's JS)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    reports = sorted(folder.glob("*.html"), key=lambda p: p.stat().st_mtime)
    for old in reports[:-KEEP_REPORTS]:
        old.unlink(missing_ok=True)
    return path
