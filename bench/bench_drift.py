"""Drift detection on the embedded data: tuneloop's calibrated views against Evidently's defaults, in one run.

The training domain is airline tweets; drifted traffic mixes in other-topic tweets (self-driving cars, Apple,
Claritin, Coachella, DeflateGate). The reference is tuneloop's own (a seeded sample of 2,000 training inputs) and
thresholds are calibrated on the disjoint pool exactly as `tuneloop drift` does; live no-drift traffic is drawn
from airline tweets outside both (the rest of the training set and the held-out set), so false alarms are measured
out of sample. Every window is scored once per method on the same texts:

- tuneloop: the default views (Evidently's text domain classifier, MiniLM novelty, descriptors) at their calibrated
  thresholds, alpha = 5 % / 4 views each (the default output view needs live answers, so it is not in this bench
  but keeps its share of the budget);
- Evidently text drift at its default threshold (domain-classifier ROC AUC > 0.55) — the same Evidently call
  tuneloop's domain_classifier view makes, so the only difference is the threshold;
- Evidently EmbeddingsDrift's default method (ModelDriftMethod, ROC AUC > 0.55) on the same MiniLM embeddings.

Timing (`bench drift_timing`): a drift check over 1k/10k/50k captured prompts read from the store, with the
embedding cache warm (the steady state of a scheduled check) against the identical computation on a cold cache
(every prompt embedded).
Calibration is excluded from both: it runs once per window size and is stored.
"""

from __future__ import annotations

import random
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from bench.setup import CACHE, chat_sets, sentiment_sets
from bench.tables import Table, emit
from tuneloop.config import Config, parse_config
from tuneloop.monitor.calibration import calibrate_views
from tuneloop.monitor.embeddings import EmbeddingBackend, make_embedder
from tuneloop.monitor.views import (
    DescriptorsView,
    DomainClassifierView,
    EmbeddingModelView,
    EmbeddingNoveltyView,
    InputView,
    TextFeatures,
)

EVIDENTLY_DEFAULT = 0.55
DEFAULT_BACKEND = Config().monitor.embedding_backend
TORCH_LABEL = "torch fp32 MiniLM (before onnx-int8)"
CHECK_EVERY = 50


@dataclass
class Paired:
    """The same texts' features on the default embedding backend and on the fp32 torch one: every window is drawn
    once and scored on both, so the two backends' false alarms and power are a paired comparison."""

    main: TextFeatures
    torch: TextFeatures

    def take(self, index: np.ndarray) -> Paired:
        return Paired(self.main.take(index), self.torch.take(index))

    def __len__(self) -> int:
        return len(self.main)


@dataclass
class Methods:
    """Scores a window once per view and turns the scores into each method's verdict."""

    domain: DomainClassifierView
    novelty: EmbeddingNoveltyView
    descriptors: DescriptorsView
    embedding_model: EmbeddingModelView
    thresholds: dict[str, float]
    torch_novelty: EmbeddingNoveltyView
    torch_novelty_threshold: float

    def verdicts(self, window: Paired) -> dict[str, bool]:
        domain = self.domain.score(window.main)[0]
        novelty = self.novelty.score(window.main)[0]
        descriptors = self.descriptors.score(window.main)[0]
        model = self.embedding_model.score(window.main)[0]
        torch_novelty = self.torch_novelty.score(window.torch)[0] > self.torch_novelty_threshold
        t = self.thresholds
        others = domain > t["domain_classifier"] or descriptors > t["descriptors"]
        return {
            "tuneloop (calibrated views)": others or novelty > t["embedding_novelty"],
            "  tuneloop: embedding_novelty alone": novelty > t["embedding_novelty"],
            "  tuneloop: domain classifier, calibrated": domain > t["domain_classifier"],
            f"tuneloop, {TORCH_LABEL}": others or torch_novelty,
            f"  tuneloop: embedding_novelty alone, {TORCH_LABEL}": torch_novelty,
            "Evidently text drift, default 0.55": domain > EVIDENTLY_DEFAULT,
            "Evidently EmbeddingsDrift (model), default 0.55": model > EVIDENTLY_DEFAULT,
        }


def run(*, quick: bool = False) -> list[Table]:
    sizes = (100, 200) if quick else (100, 200, 500)
    windows = 20 if quick else 300
    power_windows = 12 if quick else 60
    trials = 4 if quick else 20
    calibration_windows = 20 if quick else Config().monitor.calibration_windows
    sets = sentiment_sets()
    train = list(dict.fromkeys(e.last_user_text() for e in sets["train"]))
    random.Random(7).shuffle(train)  # tuneloop's reference_sample: seeded shuffle of the training inputs
    reference_texts, pool_texts = train[:2000], train[2000:5000]
    live_airline = train[5000:] + [e.last_user_text() for e in sets["heldout"]]
    other = [e.last_user_text() for e in sets["other-topics"]]
    if quick:
        reference_texts, pool_texts, live_airline, other = (reference_texts[:1100], pool_texts[:800],
                                                            live_airline[:1500], other[:400])
    features: dict[str, list[TextFeatures]] = {}
    for backend in (DEFAULT_BACKEND, "torch"):
        embedder = make_embedder(backend, CACHE / "drift", cache_file=CACHE / "drift" / "embeddings.sqlite")
        print(f"embedding {len(reference_texts) + len(pool_texts) + len(live_airline) + len(other)} texts with "
              f"{backend} (cached in {CACHE / 'drift'})", flush=True)
        features[backend] = [TextFeatures.build(texts, embedder, progress=True)
                             for texts in (reference_texts, pool_texts, live_airline, other)]
    agreement = _agreement(features[DEFAULT_BACKEND], features["torch"])
    reference, pool, airline_main, off_topic_main = features[DEFAULT_BACKEND]
    torch_reference, torch_pool, airline_torch, off_topic_torch = features["torch"]
    airline, off_topic = Paired(airline_main, airline_torch), Paired(off_topic_main, off_topic_torch)

    domain, novelty, descriptors = DomainClassifierView(), EmbeddingNoveltyView(), DescriptorsView()
    views: list[InputView] = [domain, novelty, descriptors]
    model_view = EmbeddingModelView()
    for view in [*views, model_view]:
        view.fit(reference)
    torch_novelty = EmbeddingNoveltyView()
    torch_novelty.fit(torch_reference)
    alpha = 0.05 / 4
    rng = np.random.default_rng(2026)
    rows: list[list[object]] = []
    calibration_rows: list[list[object]] = []
    detection_rows: dict[str, dict[int, list[int | None]]] = {}
    for size in sizes:
        calibrations = calibrate_views(views, pool, size, alpha, calibration_windows, seed=7, progress=True)
        thresholds = {c.view: c.threshold for c in calibrations if c.view != "any"}
        calibration_rows += [[size, c.view, "" if c.view == "any" else f"{c.threshold:.4f}",
                              f"{c.false_alarm_rate:.1%}", c.n_windows] for c in calibrations]
        torch_calibration = calibrate_views([torch_novelty], torch_pool, size, alpha, calibration_windows, seed=7)
        calibration_rows += [[size, f"{c.view}, {TORCH_LABEL}", f"{c.threshold:.4f}", f"{c.false_alarm_rate:.1%}",
                              c.n_windows] for c in torch_calibration if c.view != "any"]
        methods = Methods(domain, novelty, descriptors, model_view, thresholds, torch_novelty,
                          torch_calibration[0].threshold)

        def mixed(share: float, n: int = size) -> Paired:
            k = int(round(share * n))
            idx_a = rng.choice(len(airline), n - k, replace=False)
            idx_o = rng.choice(len(off_topic), k, replace=False)
            return _concat(airline.take(idx_a), off_topic.take(idx_o))

        rates: dict[str, list[list[bool]]] = {}
        for label, share, count in (("fa", 0.0, windows), ("p10", 0.10, power_windows),
                                    ("p25", 0.25, power_windows)):
            for _ in range(count):
                for method, flagged in methods.verdicts(mixed(share)).items():
                    rates.setdefault(method, [[], [], []])[["fa", "p10", "p25"].index(label)].append(flagged)
            print(f"W={size} {label} done", flush=True)
        for method, (fa, p10, p25) in rates.items():
            low, high = _wilson(sum(fa), len(fa))
            rows.append([method, size, f"{np.mean(fa):.1%} [{low:.1%}, {high:.1%}]", f"{np.mean(p10):.0%}",
                         f"{np.mean(p25):.0%}"])
        for method, delays in _detection(methods, airline, off_topic, size, trials, rng).items():
            detection_rows.setdefault(method, {})[size] = delays

    tables = [emit(
        "False alarms and power by window size",
        ["method", "window W", "false alarms (no drift) [95 % CI]", "power, 10 % other topics",
         "power, 25 % other topics"],
        rows, key="drift_detection",
        notes=f"{windows} no-drift windows of held-back airline tweets and {power_windows} windows per mix, each "
              "scored by every method on the same texts. Target: at most 5 % false alarms, a 10 % mix flagged in "
              ">= 90 % of W = 500 windows. Indented rows are single tuneloop views at their own calibrated "
              "threshold (alpha 1.25 %), shown to say where the power comes from.")]
    detection = []
    for method, by_size in detection_rows.items():
        cells = []
        for size in sizes:
            delays = by_size[size]
            found = [d for d in delays if d is not None]
            median = statistics.median(found) if len(found) == len(delays) else None
            cells.append(f"{median:.0f}" if median is not None else
                         f"missed {len(delays) - len(found)}/{len(delays)}")
        within = [sum(1 for d in by_size[s] if d is not None and d <= 100) / len(by_size[s]) for s in sizes]
        detection.append([method, *cells, *(f"{w:.0%}" for w in within)])
    tables.append(emit(
        "Requests from onset to detection, 30 % other-topic shift (checks every 50 requests)",
        ["method", *(f"median, W={s}" for s in sizes), *(f"within 100, W={s}" for s in sizes)], detection,
        key="drift_delay",
        notes=f"{trials} trials per window size: W airline requests, then a stream with 30 % other-topic tweets; "
              "the last W requests are checked every 50 requests after the onset (up to 500). Target: median <= "
              "100 requests. 'missed k/n': not flagged within 500 requests in k trials."))
    tables.append(agreement)
    tables.append(emit("Calibration (stored per window size)", ["W", "view", "threshold", "measured false alarms",
                                                               "windows"], calibration_rows, key="drift_calibration",
                       notes="Threshold from the fit half of the pool; false alarms measured on as many windows "
                             "from the other half. `any`: a window flagged by at least one view (the task verdict)."))
    return tables


def run_timing(*, quick: bool = False) -> list[Table]:
    return [_timing(quick=quick)]


def _agreement(main: list[TextFeatures], torch: list[TextFeatures]) -> Table:
    """How close the default backend's vectors are to fp32 torch's, text by text, over every text of the bench."""
    cosines = np.concatenate([(a.embeddings * b.embeddings).sum(axis=1)  # type: ignore[operator]
                              for a, b in zip(main, torch, strict=True)])
    return emit(f"{DEFAULT_BACKEND} vectors against torch fp32 vectors of the same texts",
                ["texts", "mean cosine", "1st percentile", "minimum"],
                [[f"{len(cosines):,}", f"{cosines.mean():.4f}", f"{np.quantile(cosines, 0.01):.4f}",
                  f"{cosines.min():.4f}"]], key="drift_embedding_agreement",
                notes="Both vectors L2-normalised, so the cosine is their dot product. The views are calibrated on "
                      "each backend's own vectors; this says how far apart the two spaces are, not which is right.")


def _wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a rate k/n (sensible at 0 and at small k, unlike the normal one)."""
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _concat(a: Paired, b: Paired) -> Paired:
    return Paired(_concat_features(a.main, b.main), _concat_features(a.torch, b.torch))


def _concat_features(a: TextFeatures, b: TextFeatures) -> TextFeatures:
    assert a.embeddings is not None and b.embeddings is not None
    return TextFeatures(a.texts + b.texts, np.concatenate([a.embeddings, b.embeddings]),
                        np.concatenate([a.descriptors, b.descriptors]))


def _detection(methods: Methods, airline: Paired, other: Paired, size: int, trials: int,
               rng: np.random.Generator) -> dict[str, list[int | None]]:
    delays: dict[str, list[int | None]] = {}
    horizon = 500
    for _ in range(trials):
        before = airline.take(rng.choice(len(airline), size, replace=False))
        is_other = rng.random(horizon) < 0.30
        after_a = airline.take(rng.choice(len(airline), int((~is_other).sum()), replace=False))
        after_o = other.take(rng.choice(len(other), int(is_other.sum()), replace=False))
        order = np.empty(horizon, dtype=int)  # interleave in stream order
        order[~is_other] = np.arange(int((~is_other).sum()))
        order[is_other] = np.arange(int(is_other.sum())) + int((~is_other).sum())
        stream_after = _concat(after_a, after_o).take(order)
        stream = _concat(before, stream_after)
        pending = set(methods.verdicts(before))  # method names
        found: dict[str, int | None] = {m: None for m in pending}
        for requests in range(CHECK_EVERY, horizon + 1, CHECK_EVERY):
            if not pending:
                break
            end = size + requests
            verdicts = methods.verdicts(stream.take(np.arange(end - size, end)))
            for method in list(pending):
                if verdicts[method]:
                    found[method] = requests
                    pending.discard(method)
        for method, delay in found.items():
            delays.setdefault(method, []).append(delay)
    return delays


def _timing(*, quick: bool) -> Table:
    """A drift check's read + features + views over N captured prompts: warm embedding cache vs cold, and cold on
    the default backend vs cold on the fp32 torch path it replaced, in alternating order."""
    from tuneloop.monitor.samples import reference_sample, traffic_window
    from tuneloop.store import Store
    from tuneloop.tables import TrafficRow

    sizes = (200, 1000) if quick else (1_000, 10_000, 50_000)
    texts = _many_texts(max(sizes))
    backends: tuple[EmbeddingBackend, ...] = ("torch", DEFAULT_BACKEND)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        config = parse_config("data_dir: data\n", config_dir=Path(tmp))
        store = Store(config.resolved_database_url)
        from tuneloop.challenger_sets.embedded import ensure_embedded_datasets

        ensure_embedded_datasets(store, config.data_path, ["sentiment"])
        with store.session() as session:
            now = datetime.now(UTC)
            session.add_all(TrafficRow(request_id=uuid.uuid4().hex, created_at=now, task="sentiment",
                                       adapter_version=1, route="champion", endpoint="chat", prompt_text=t,
                                       messages=[], completion="negative", latency_ms=1.0, status=200)
                            for t in texts)
        reference = reference_sample(config, store, "sentiment")
        warm_cache = Path(tmp) / "warm.sqlite"
        for backend in backends:  # the reference's vectors in both spaces; builds the ONNX model (not timed)
            make_embedder(backend, config.data_path, cache_file=warm_cache).embed(reference.texts)
        for k, n in enumerate(sizes):
            cold_runs: dict[str, list[float]] = {b: [] for b in backends}
            warm_runs = []
            for repeat in range(1 if n >= 50_000 else 2):
                order = backends if (k + repeat) % 2 == 0 else backends[::-1]
                for backend in order:
                    # A cold cache holds only the reference's vectors: both backends embed exactly the N prompts.
                    cold_cache = Path(tmp) / f"cold-{backend}-{n}-{repeat}.sqlite"
                    shutil.copy(warm_cache, cold_cache)
                    cold_runs[backend].append(_one_check(config, store, reference, n, cold_cache, backend,
                                                         traffic_window))
                    if backend == DEFAULT_BACKEND:
                        warm_runs.append(_one_check(config, store, reference, n, cold_cache, backend,
                                                    traffic_window))
            torch_cold, cold, warm = min(cold_runs["torch"]), min(cold_runs[DEFAULT_BACKEND]), min(warm_runs)
            rows.append([f"{n:,}", f"{warm:.1f}", f"{torch_cold:.1f}", f"{cold:.1f}", f"{torch_cold / cold:.2f}x",
                         f"{n / cold:,.0f}", f"{n / warm:,.0f}"])
            print(f"timing n={n}: warm {warm:.1f} s, cold torch {torch_cold:.1f} s, cold {DEFAULT_BACKEND} "
                  f"{cold:.1f} s", flush=True)
        store.close()
    return emit("Drift check time over N captured prompts (seconds, 2 cores)",
                ["captured prompts", f"cached embeddings ({DEFAULT_BACKEND})", "cold cache, torch fp32 (before)",
                 f"cold cache, {DEFAULT_BACKEND}", "cold speed-up", "prompts/s cold", "prompts/s cached"],
                rows, key="drift_timing",
                notes="Read the last N prompts from the store, embed (cache lookup or MiniLM), fit and score the "
                      "default views against the 2,000-text reference. Calibration excluded (once per window size, "
                      "stored); the ONNX model's one-off build excluded (once per data dir). The two cold runs "
                      "alternate order between repeats and sizes; each size is the best of 2 (1 at 50k). Targets: "
                      "50k cached under 60 s; cold >= 3x the torch fp32 path.")


def _one_check(config: Config, store: object, reference: object, n: int, cache_path: Path, backend: EmbeddingBackend,
               read: Callable[..., object]) -> float:
    """Seconds for read + features + fit + score, with the embedder of `backend` pointed at `cache_path`."""
    from tuneloop.monitor.views import make_input_views

    embedder = make_embedder(backend, config.data_path, cache_file=cache_path)
    started = time.perf_counter()
    window = read(store, "sentiment", last=n)
    views = make_input_views(config.monitor.views)
    reference_features = TextFeatures.build(reference.texts, embedder)  # type: ignore[attr-defined]
    current = TextFeatures.build(window.prompts, embedder)  # type: ignore[attr-defined]
    for view in views:
        view.fit(reference_features)
        view.score(current)
    return time.perf_counter() - started


def _many_texts(n: int) -> list[str]:
    """Distinct real texts: every tweet, then chat turns, then numbered repeats if still short."""
    sets, chats = sentiment_sets(), chat_sets()
    texts = [e.last_user_text() for name in ("train", "heldout", "other-topics") for e in sets[name]]
    texts += [e.last_user_text() for split in chats.values() for e in split]
    unique = list(dict.fromkeys(t for t in texts if t.strip()))
    i = 0
    while len(unique) < n:
        unique.append(f"{unique[i]} ({i})")
        i += 1
    random.Random(3).shuffle(unique)
    return unique[:n]
