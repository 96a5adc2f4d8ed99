"""One retraining job's stage sequence (retrain/worker.py) on a real store and a scripted endpoint over real HTTP,
with training replaced by a stand-in that registers a version (tests/retrain/test_loop_live.py trains for real):
the stages run in order and are recorded, a better candidate is promoted and watched, a worse one is released, a
set too small to decide stops the job before training, and a crash fails the job and removes its staging folder."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import RecordingDeployment
from tests.monitor.helpers import answer_by_rule, make_dataset, register_champion, register_version
from tests.stub_endpoint import stub_endpoint
from tuneloop.config import Config, RetrainConfig
from tuneloop.errors import TrainingError
from tuneloop.registry import AdapterVersion, find_alias, get_adapter
from tuneloop.retrain.jobs import JobStore, staging_prefix
from tuneloop.retrain.records import JobSettings, ManualTrigger
from tuneloop.retrain.worker import run_job
from tuneloop.store import Store


@pytest.fixture
def task_data(config: Config, store: Store) -> Config:
    config.evaluation.bootstrap_resamples = 300
    config.tasks["sentiment"].retrain.watch_s = 600
    make_dataset(store, config, "train", 120, kind="train")
    make_dataset(store, config, "heldout", 300, kind="heldout")
    make_dataset(store, config, "other-topics", 400)
    return config


class FakeTraining:
    """Stands in for finetune: registers the next version, or fails after leaving a staging folder behind."""

    def __init__(self, store: Store, config: Config, *, fail: bool = False) -> None:
        self.store, self.config, self.fail = store, config, fail
        self.calls: list[dict[str, Any]] = []

    def __call__(self, config: Config, store: Store, task: str, **kwargs: Any) -> AdapterVersion:
        self.calls.append({"task": task, **kwargs})
        if self.fail:
            (config.data_path / "adapters" / task / f"{kwargs['staging_prefix']}abc").mkdir(parents=True)
            raise TrainingError("loss became nan at step 3")
        register_version(store, task, 2)
        return get_adapter(store, f"{task}@2")


def queued(store: Store, key: str = "manual:1") -> int:
    """A job as the trigger path leaves it for a worker."""
    return JobStore(store).submit("sentiment", ManualTrigger(key=key, reason="test"), runner="test",
                                  champion_version=1, settings=JobSettings(retrain=RetrainConfig())).job.id


@pytest.fixture
def training(task_data: Config, store: Store, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeTraining]:
    fake = FakeTraining(store, task_data)
    monkeypatch.setattr("tuneloop.retrain.finetune.finetune", fake)
    yield fake


def test_a_better_candidate_goes_through_every_stage_and_is_promoted_and_watched(
        task_data: Config, store: Store, training: FakeTraining) -> None:
    register_champion(store, "sentiment", 1)
    job_id = queued(store)
    with stub_endpoint(answer_by_rule({"sentiment@1": 2})) as endpoint:
        deployment = RecordingDeployment(store, endpoint.url)
        assert run_job(task_data, store, job_id, deployment) == "promoted"
    job = JobStore(store).get(job_id)
    assert list(job.stages) == ["assemble", "train", "evaluate", "promote"]
    assert all(s.status == "done" for s in job.stages.values())
    assert job.decision is not None and job.decision.promote and job.candidate_version == 2
    assert job.settings.challenger_sets == ["sentiment/other-topics"], "the job recorded what it judged"
    assert job.dataset_ref == f"sentiment/retrain-job{job_id}@1" and job.pid is not None
    assert job.watch is not None and job.watch.status == "watching" and job.watch.previous_version == 1
    assert ("promote", "sentiment@2") in deployment.calls and ("release", "sentiment@2") not in deployment.calls
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == 2
    [trained] = training.calls
    assert trained["init_from"] is not None and trained["init_from"].version == 1, "continues the champion"
    assert trained["staging_prefix"] == staging_prefix(job_id)


def test_a_worse_candidate_is_rejected_released_and_the_champion_stays(task_data: Config, store: Store,
                                                                        training: FakeTraining) -> None:
    register_champion(store, "sentiment", 1)
    job_id = queued(store)
    with stub_endpoint(answer_by_rule({"sentiment@2": 2})) as endpoint:
        deployment = RecordingDeployment(store, endpoint.url)
        assert run_job(task_data, store, job_id, deployment) == "rejected"
    job = JobStore(store).get(job_id)
    assert "promote" not in job.stages and job.watch is None
    assert job.decision is not None and not job.decision.promote and job.decision.reasons
    assert ("release", "sentiment@2") in deployment.calls and not any(c[0] == "promote" for c in deployment.calls)
    champion = find_alias(store, "sentiment", "champion")
    assert champion is not None and champion.version == 1


def test_a_set_too_small_to_decide_stops_the_job_before_training(task_data: Config, store: Store,
                                                                 training: FakeTraining) -> None:
    register_champion(store, "sentiment", 1)
    task_data.tasks["sentiment"].retrain.gate.margin = 0.01
    job_id = queued(store)
    assert run_job(task_data, store, job_id, RecordingDeployment(store)) == "rejected"
    job = JobStore(store).get(job_id)
    assert job.decision is not None and job.decision.preflight and "too small to decide" in job.decision.reasons[0]
    assert job.stages == {} and training.calls == [] and job.candidate_version is None


def test_no_champion_and_a_crash_fail_the_job_with_the_reason(task_data: Config, store: Store,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = queued(store)
    assert run_job(task_data, store, job_id, RecordingDeployment(store)) == "failed"
    assert "has no champion" in (JobStore(store).get(job_id).error or "")

    register_champion(store, "sentiment", 1)
    crash = FakeTraining(store, task_data, fail=True)
    monkeypatch.setattr("tuneloop.retrain.finetune.finetune", crash)
    again = queued(store, "manual:2")
    assert run_job(task_data, store, again, RecordingDeployment(store)) == "failed"
    job = JobStore(store).get(again)
    assert job.error == "TrainingError: loss became nan at step 3" and not job.active
    assert job.stages["train"].status == "failed" and job.stages["assemble"].status == "done"
    staging = Path(task_data.data_path / "adapters" / "sentiment")
    assert not list(staging.glob(staging_prefix(again) + "*")), "the half-written adapter folder is removed"
