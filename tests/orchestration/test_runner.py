"""The job runner in-process against a live api and a real MLflow server (no Prefect in between)."""

from __future__ import annotations

import itertools
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import optuna
import pandas as pd
import psutil
import pytest
from mlflow.tracking import MlflowClient

from miniml.config import Settings
from miniml.orchestration.runner import run_job
from miniml.sdk.client import Client
from miniml.training.search import make_storage
from tests.conftest import LiveApi, free_port
from tests.orchestration.conftest import group_members, slow_dataset, trainers_of

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


@pytest.fixture
def live(tmp_path: Path, mlflow_uri: str) -> Iterator[tuple[LiveApi, Client]]:
    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        worker={"heartbeat_s": 0.5, "trial_threads": 2},
    )
    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create("demo")
        client.datasets.upload("demo", IRIS)
        yield api, client


def test_iris_job_runs_to_a_registered_staging_model(live: tuple[LiveApi, Client], mlflow_uri: str) -> None:
    api, client = live
    job = client.jobs.create(
        "demo",
        dataset="iris",
        target="target",
        max_trials=6,
        model_name="iris-clf",
        families=["linear", "random_forest", "lightgbm"],
    )
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    assert done is not None and done.state == "succeeded", (done, client.jobs.logs("demo", job.id))
    assert done.test_metrics["f1_macro"] >= 0.9
    assert done.progress.trials_done == 6 and len(done.leaderboard) == 6
    assert {t.family for t in done.leaderboard} <= {"linear", "random_forest", "lightgbm"}
    assert done.model_name == "demo.iris-clf" and done.model_version
    mlflow.set_tracking_uri(mlflow_uri)
    model = mlflow.pyfunc.load_model("models:/demo.iris-clf@staging")
    row = pd.read_csv(IRIS).drop(columns=["target"]).head(3)
    assert set(model.predict(row)) <= {"Iris-setosa", "Iris-versicolor", "Iris-virginica"}
    mc = MlflowClient(mlflow_uri)
    parent = mc.get_run(done.mlflow_run_id)  # type: ignore[arg-type]
    assert parent.data.tags["miniml.dataset_sha256"] == client.datasets.version("demo", "iris", 1).sha256
    assert float(parent.data.metrics["test_f1_macro"]) == pytest.approx(done.test_metrics["f1_macro"])
    children = mc.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 6
    plots = {a.path for a in mc.list_artifacts(parent.info.run_id, "plots")}
    assert {"plots/optimisation_history.png", "plots/confusion_matrix.png"} <= plots
    # A second worker picking up the same job finds it taken: it never runs twice.
    assert run_job(api.worker_client(), api.settings, job.id, "demo") is None


def test_the_served_model_learnt_from_every_row(live: tuple[LiveApi, Client], mlflow_uri: str) -> None:
    """The test split scores the configuration; the registered model is then fitted on all rows."""
    api, client = live
    job = client.jobs.create(
        "demo", dataset="iris", target="target", max_trials=1, model_name="iris-all", families=["linear"]
    )
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    assert done is not None and done.state == "succeeded", (done, client.jobs.logs("demo", job.id))
    rows = len(pd.read_csv(IRIS))
    mlflow.set_tracking_uri(mlflow_uri)
    pipe = mlflow.sklearn.load_model("models:/demo.iris-all@staging")
    scaler = pipe.named_steps["preprocess"].named_transformers_["numeric"].named_steps["scale"]
    assert scaler.n_samples_seen_ == rows  # the split's model saw only the training rows
    assert MlflowClient(mlflow_uri).get_run(done.mlflow_run_id).data.params["best.training_rows"] == str(rows)  # type: ignore[arg-type]
    assert any(f"final fit on all {rows} rows" in line.message for line in client.jobs.logs("demo", job.id))


def test_a_project_made_again_under_a_deleted_ones_name_starts_empty(
    live: tuple[LiveApi, Client], mlflow_uri: str, tmp_path: Path
) -> None:
    """Deleting a project deletes its registered models and its MLflow experiment (renamed out of
    the way: MLflow keeps a deleted experiment's name), its dataset files and its captured
    predictions. Before, a project made again under the same name found the old models, ready to
    deploy, and the old runs."""
    api, client = live
    job = client.jobs.create(
        "demo", dataset="iris", target="target", max_trials=1, model_name="iris-gone", families=["linear"]
    )
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    assert done is not None and done.state == "succeeded", (done, client.jobs.logs("demo", job.id))
    store = api.app.state.store
    sample = tmp_path / "capture.jsonl"
    sample.write_text("{}\n")
    for owner in ("demo", "demo2"):  # what the inference replicas capture, by project name
        store.put_file(f"capture/{owner}/web/2026-12-04/1.jsonl", sample)
    assert store.list_keys("projects/")  # the dataset's file, under the project's id
    mc = MlflowClient(mlflow_uri)
    experiment = mc.get_experiment_by_name("miniml/demo")
    assert experiment is not None and mc.search_registered_models("name = 'demo.iris-gone'")

    client.projects.delete("demo")
    assert mc.get_experiment_by_name("miniml/demo") is None
    retired = mc.get_experiment(experiment.experiment_id)
    assert retired.lifecycle_stage == "deleted" and retired.name == f"miniml/demo@deleted-{experiment.experiment_id}"
    assert mc.search_registered_models("name LIKE 'demo.%'") == []
    assert store.list_keys("projects/") == [] and store.list_keys("capture/demo/") == []
    assert store.list_keys("capture/demo2/") == ["capture/demo2/web/2026-12-04/1.jsonl"]  # another project's
    client.projects.create("demo")
    assert client.models.list("demo") == [] and client.jobs.list("demo") == []


def test_a_reproducible_job_repeats_its_leaderboard(live: tuple[LiveApi, Client]) -> None:
    """``reproducible``: trials one at a time (the worker's two trial threads are not used), so the
    same data and seed give the same trials, configurations and scores, and the same model."""
    api, client = live
    boards, tests = [], []
    for name in ("first", "again"):
        job = client.jobs.create(
            "demo",
            dataset="iris",
            target="target",
            max_trials=8,
            seed=5,
            reproducible=True,
            families=["linear", "lightgbm", "random_forest"],
            model_name=name,
        )
        assert job.spec["reproducible"] is True
        done = run_job(api.worker_client(), api.settings, job.id, "demo")
        assert done is not None and done.state == "succeeded", (done, client.jobs.logs("demo", job.id))
        trials = sorted(done.leaderboard, key=lambda t: t.number)
        assert len(trials) == 8
        # One at a time: each trial started after the one before it finished.
        spans = [(t.finished_at.timestamp() - t.duration_s, t.finished_at.timestamp()) for t in trials if t.finished_at]
        assert all(later[0] >= earlier[1] - 0.05 for earlier, later in itertools.pairwise(spans)), spans
        boards.append([(t.number, t.family, t.params, t.state, t.score) for t in trials])
        tests.append(done.test_metrics)
    assert boards[1] == boards[0]
    assert tests[1] == tests[0]


def test_cancel_stops_a_running_job_within_seconds(live: tuple[LiveApi, Client]) -> None:
    api, client = live
    job = client.jobs.create("demo", dataset="iris", target="target", timeout_s=300, families=["random_forest"])
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(run_job(api.worker_client(), api.settings, job.id, "demo")))
    thread.start()
    deadline = time.monotonic() + 60
    while client.jobs.get("demo", job.id).progress.trials_done < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    asked = time.monotonic()
    client.jobs.cancel("demo", job.id)
    thread.join(60)
    final = client.jobs.get("demo", job.id)
    assert final.state == "cancelled", final.reason
    assert time.monotonic() - asked < 15
    assert final.progress.trials_done >= 2


def test_a_job_that_breaks_while_running_fails_with_its_reason(live: tuple[LiveApi, Client]) -> None:
    api, client = live
    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=2)
    # The stored file disappears under the job: the run must end failed, saying why.
    for key in api.app.state.store.list_keys("projects/"):
        api.app.state.store.delete(key)
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    assert done is not None and done.state == "failed"
    assert "missing" in (done.reason or "")
    assert any(line.level == "error" for line in client.jobs.logs("demo", job.id))


def test_a_stale_flow_run_for_another_job_does_nothing(live: tuple[LiveApi, Client]) -> None:
    """A flow run left in Prefect's queue by an earlier database names a job id this one reuses."""
    api, client = live
    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=2)
    created = job.created_at.timestamp()
    assert run_job(api.worker_client(), api.settings, job.id, "demo", created=created - 3600) is None
    assert run_job(api.worker_client(), api.settings, job.id + 1, "demo", created=created) is None  # no such job here
    after = client.jobs.get("demo", job.id)
    assert after.state == "queued" and after.worker is None and after.progress.trials_claimed == 0
    assert not any("running on" in line.message for line in client.jobs.logs("demo", job.id))


def test_a_job_takes_only_the_run_opened_for_it(live: tuple[LiveApi, Client], mlflow_uri: str) -> None:
    """Another project's run, another job's run, or an unknown id are refused; the job's own is taken."""
    from miniml.tracking.runs import Tracker

    api, client = live
    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=1)
    worker = api.worker_client()
    worker.job_reports.start("demo", job.id, "w1")
    tracker = Tracker(mlflow_uri)
    foreign = tracker.start_job_run("elsewhere", job.id, {})
    other_job = tracker.start_job_run("demo", job.id + 1000, {})
    for run_id in (foreign, other_job, "0" * 32):
        with pytest.raises(Exception, match="takes only the parent run"):
            worker.job_reports.set_run("demo", job.id, run_id)
    assert client.jobs.get("demo", job.id).mlflow_run_id is None
    own = tracker.start_job_run("demo", job.id, {})
    assert worker.job_reports.set_run("demo", job.id, own).mlflow_run_id == own


def test_a_reaped_job_ends_its_mlflow_runs_failed(tmp_path: Path, mlflow_uri: str) -> None:
    """A worker that dies mid-job leaves its parent and trial runs RUNNING; the api's reaper ends them FAILED."""
    from miniml.tracking.runs import Tracker

    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"heartbeat_timeout_s": 1, "loop_interval_s": 0.2},
    )
    with LiveApi(settings) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create("demo")
        client.datasets.upload("demo", IRIS)
        job = client.jobs.create("demo", dataset="iris", target="target", max_trials=1)
        worker = api.worker_client()
        worker.job_reports.start("demo", job.id, "doomed")
        tracker = Tracker(mlflow_uri)
        parent = tracker.start_job_run("demo", job.id, {})
        worker.job_reports.set_run("demo", job.id, parent)
        mc = MlflowClient(mlflow_uri)
        child = mc.create_run(mc.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
        deadline = time.monotonic() + 30
        while client.jobs.get("demo", job.id).state != "failed":
            assert time.monotonic() < deadline, "the job was never reaped"
            time.sleep(0.2)
        while {mc.get_run(r).info.status for r in (parent, child)} != {"FAILED"}:
            assert time.monotonic() < deadline, [mc.get_run(r).info.status for r in (parent, child)]
            time.sleep(0.2)
        assert "no heartbeat" in str(client.jobs.get("demo", job.id).reason)


def test_a_failed_job_tells_why_without_a_traceback(live: tuple[LiveApi, Client]) -> None:
    """The job log and reason say what failed; the traceback stays in the worker's own log."""
    api, client = live
    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=1)
    for stored in (api.settings.data_dir / "objects").rglob("*.csv"):
        stored.unlink()  # the dataset's file is gone: the worker cannot read it
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    assert done is not None and done.state == "failed" and done.reason
    lines = [line.message for line in client.jobs.logs("demo", job.id)]
    assert any(line.startswith("failed: ") for line in lines), lines
    text = "\n".join([*lines, done.reason])
    assert "Traceback" not in text and 'File "' not in text and "[SQL:" not in text, text


@pytest.fixture
def slow_job(
    live: tuple[LiveApi, Client], tmp_path: Path
) -> Iterator[tuple[int, threading.Thread, list[object], psutil.Process]]:
    """A job whose two trial threads are both deep in a minutes-long fit, run by ``run_job`` in a thread."""
    api, client = live
    client.datasets.upload("demo", slow_dataset(tmp_path / "slow.parquet"))
    job = client.jobs.create("demo", dataset="slow", target="label", max_trials=4, families=["random_forest"], seed=0)
    result: list[object] = []
    thread = threading.Thread(
        target=lambda: result.append(run_job(api.worker_client(), api.settings, job.id, "demo")), daemon=True
    )
    thread.start()
    try:
        deadline = time.monotonic() + 120
        while client.jobs.get("demo", job.id).progress.trials_claimed < 2:
            assert time.monotonic() < deadline and thread.is_alive(), client.jobs.logs("demo", job.id)
            time.sleep(0.2)
        [trainer] = trainers_of(job.id, api.settings.data_dir)
        # Forked by the trainer server the worker (here: this process) started, in a session of its own.
        assert trainer.parent().ppid() == os.getpid() and "--serve" in trainer.parent().cmdline()
        assert os.getpgid(trainer.pid) == trainer.pid
        time.sleep(3)
        assert trainer.is_running() and client.jobs.get("demo", job.id).progress.trials_done == 0  # both mid-fit
        yield job.id, thread, result, trainer
    finally:
        for left in trainers_of(
            job.id, api.settings.data_dir
        ):  # a failed test must not leave minutes of fitting behind
            os.killpg(left.pid, signal.SIGKILL)


def _runs(mlflow_uri: str, run_id: str | None) -> tuple[str, dict[str, str]]:
    """The parent run's status and each trial run's status by name."""
    assert run_id
    mc = MlflowClient(mlflow_uri)
    parent = mc.get_run(run_id)
    children = mc.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{run_id}'")
    return parent.info.status, {c.info.run_name: c.info.status for c in children}


def test_cancel_kills_trials_in_the_middle_of_their_fit(
    live: tuple[LiveApi, Client],
    slow_job: tuple[int, threading.Thread, list[object], psutil.Process],
    mlflow_uri: str,
) -> None:
    """A cancel stops trials that would fit for minutes: the job ends cancelled within 30 s, its trainer
    and all it started are gone, the cut trials end pruned in Optuna with the reason, its runs KILLED."""
    api, client = live
    job_id, thread, result, trainer = slow_job
    asked = time.monotonic()
    client.jobs.cancel("demo", job_id)
    thread.join(60)
    took = time.monotonic() - asked
    final = client.jobs.get("demo", job_id)
    assert final.state == "cancelled" and final.reason == "cancelled by request", final.reason
    assert took < 30, f"the cancel took {took:.1f}s"
    assert not thread.is_alive() and getattr(result[0], "state", None) == "cancelled"
    assert (
        not trainer.is_running()
        and trainers_of(job_id, api.settings.data_dir) == []
        and group_members(trainer.pid) == []
    )
    study = optuna.load_study(study_name=f"miniml-job-{job_id}", storage=make_storage(api.settings.db_url))
    assert [(t.state.name, t.user_attrs.get("error")) for t in study.trials] == [("PRUNED", "cancelled mid-trial")] * 2
    assert {(t.state, t.error) for t in final.leaderboard} == {("pruned", "cancelled mid-trial")}
    assert final.progress.trials_done == 2
    parent, children = _runs(mlflow_uri, final.mlflow_run_id)
    assert parent == "KILLED" and set(children.values()) == {"KILLED"} and len(children) == 2, children
    print(f"cancel of job {job_id} took {took:.1f}s")


def test_a_trainer_that_dies_fails_the_job_with_its_exit(
    live: tuple[LiveApi, Client],
    slow_job: tuple[int, threading.Thread, list[object], psutil.Process],
    mlflow_uri: str,
) -> None:
    """A trainer killed from outside (as the out-of-memory killer does) fails the job at once, saying so;
    its running trials end failed in Optuna and its MLflow runs FAILED."""
    api, client = live
    job_id, thread, _result, trainer = slow_job
    os.kill(trainer.pid, signal.SIGKILL)
    thread.join(60)
    final = client.jobs.get("demo", job_id)
    assert final.state == "failed" and "exit code -9" in (final.reason or ""), final.reason
    assert trainers_of(job_id, api.settings.data_dir) == [] and group_members(trainer.pid) == []
    study = optuna.load_study(study_name=f"miniml-job-{job_id}", storage=make_storage(api.settings.db_url))
    assert {t.state.name for t in study.trials} == {"FAIL"}
    assert all(str(t.user_attrs.get("error")).startswith("stopped: ") for t in study.trials)
    parent, children = _runs(mlflow_uri, final.mlflow_run_id)
    assert parent == "FAILED" and children == {}


def test_a_job_ended_elsewhere_stops_its_trials(
    live: tuple[LiveApi, Client],
    slow_job: tuple[int, threading.Thread, list[object], psutil.Process],
) -> None:
    """The api ended the job while its worker lived on (say it could not reach the api for longer than
    the heartbeat timeout): the worker's next heartbeat hears it and stops the trials."""
    from miniml.services import jobs

    api, _client = live
    job_id, thread, result, trainer = slow_job
    with api.app.state.db.begin() as session:
        assert [j for j, *_ in jobs.reap_stale_jobs(session, timeout_s=0)] == [job_id]
    thread.join(30)
    assert not thread.is_alive() and getattr(result[0], "state", None) == "failed"
    assert trainers_of(job_id, api.settings.data_dir) == [] and group_members(trainer.pid) == []
    study = optuna.load_study(study_name=f"miniml-job-{job_id}", storage=make_storage(api.settings.db_url))
    assert {(t.state.name, t.user_attrs.get("error")) for t in study.trials} == {
        ("FAIL", "stopped: the job ended elsewhere")
    }


def _left_running(api: LiveApi, client: Client, mlflow_uri: str) -> tuple[int, str, str]:
    """A job its worker started and opened a parent and a trial run for, then went silent."""
    from miniml.tracking.runs import Tracker

    job = client.jobs.create("demo", dataset="iris", target="target", max_trials=1)
    worker = api.worker_client()
    worker.job_reports.start("demo", job.id, "doomed")
    parent = Tracker(mlflow_uri).start_job_run("demo", job.id, {})
    worker.job_reports.set_run("demo", job.id, parent)
    mc = MlflowClient(mlflow_uri)
    child = mc.create_run(mc.get_run(parent).info.experiment_id, tags={"mlflow.parentRunId": parent}).info.run_id
    return job.id, parent, child


def _wait_for_statuses(mlflow_uri: str, expected: dict[str, str], timeout: float = 30) -> None:
    mc = MlflowClient(mlflow_uri)
    deadline = time.monotonic() + timeout
    while (found := {r: mc.get_run(r).info.status for r in expected}) != expected:
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def test_an_api_restart_ends_jobs_left_running_and_keeps_queued_ones(tmp_path: Path, mlflow_uri: str) -> None:
    """After a crash that took the api and the worker: once the api has been up for the heartbeat
    timeout (a live worker would have reported in by then), the jobs whose heartbeat is stale end
    (failed, or cancelled when a cancel was asked for) and their MLflow runs end to match; not
    before. A queued job stays queued, and runs."""
    first = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"heartbeat_timeout_s": 3600, "loop_interval_s": 0.2},
        worker={"heartbeat_s": 0.2},
    )
    with LiveApi(first) as api:
        client = Client(api.url, api_key=api.key)
        client.projects.create("demo")
        client.datasets.upload("demo", IRIS)
        failed, failed_parent, failed_child = _left_running(api, client, mlflow_uri)
        cancelled, cancelled_parent, cancelled_child = _left_running(api, client, mlflow_uri)
        client.jobs.cancel("demo", cancelled)
        queued = client.jobs.create("demo", dataset="iris", target="target", max_trials=1, families=["linear"])
    grace = 8
    second = first.model_copy(update={"jobs": first.jobs.model_copy(update={"heartbeat_timeout_s": grace})})
    with LiveApi(second) as api:
        started = time.monotonic()
        client = Client(api.url, api_key=api.key)
        assert client.jobs.get("demo", failed).state == "running"  # its worker may yet report in
        while client.jobs.get("demo", failed).state == "running":
            assert time.monotonic() - started < grace + 60
            time.sleep(0.2)
        assert client.jobs.get("demo", failed).state == "failed"
        assert "no heartbeat" in str(client.jobs.get("demo", failed).reason)
        assert client.jobs.get("demo", cancelled).state == "cancelled"
        assert "cancelled by request" in str(client.jobs.get("demo", cancelled).reason)
        _wait_for_statuses(
            mlflow_uri,
            {failed_parent: "FAILED", failed_child: "FAILED", cancelled_parent: "KILLED", cancelled_child: "KILLED"},
        )
        assert client.jobs.get("demo", queued.id).state == "queued"
        done = run_job(api.worker_client(), api.settings, queued.id, "demo")
        assert done is not None and done.state == "succeeded", client.jobs.logs("demo", queued.id)


def test_a_running_job_outlasts_a_restart_of_the_api(tmp_path: Path, mlflow_uri: str) -> None:
    """The api goes down for longer than the heartbeat timeout while a job trains, and comes back:
    the worker sends its calls again until the api takes them, reports in before the api would end
    the job, and the job succeeds. (Before, the first refused call failed the job, and the api, back,
    ended it at once for want of a heartbeat.)"""
    settings = Settings(
        data_dir=tmp_path / "d",
        api={"port": free_port()},
        prefect={"port": free_port()},
        mlflow={"tracking_uri": mlflow_uri},
        jobs={"heartbeat_timeout_s": 2, "loop_interval_s": 0.2},
        worker={"heartbeat_s": 0.2, "trial_threads": 2, "outlast_api_s": 120},
    )
    first = LiveApi(settings).__enter__()
    client = Client(first.url, api_key=first.key)
    client.projects.create("demo")
    client.datasets.upload("demo", slow_dataset(tmp_path / "slow.parquet"))
    job = client.jobs.create(
        "demo", dataset="slow", target="label", timeout_s=25, families=["linear", "lightgbm"], seed=0
    )
    result: list[object] = []
    worker = first.worker_client()
    thread = threading.Thread(target=lambda: result.append(run_job(worker, settings, job.id, "demo")))
    thread.start()
    deadline = time.monotonic() + 120
    while client.jobs.get("demo", job.id).progress.trials_done < 1:
        assert time.monotonic() < deadline and thread.is_alive(), result
        time.sleep(0.1)
    first.__exit__()
    time.sleep(4)  # the outage, twice the heartbeat timeout: no call of the worker gets through
    with LiveApi(settings) as second:
        thread.join(180)
        done = result[0]
        assert getattr(done, "state", None) == "succeeded", Client(second.url, api_key=second.key).jobs.logs(
            "demo", job.id
        )


def test_the_api_ends_the_runs_a_worker_left_open(live: tuple[LiveApi, Client], mlflow_uri: str) -> None:
    """A worker that could not end its MLflow runs (MLflow away at that moment) reports the job's end
    all the same; the api ends the parent and trial runs to match."""
    from miniml.schemas.jobs import JobFinish

    api, client = live
    job_id, parent, child = _left_running(api, client, mlflow_uri)
    api.worker_client().job_reports.finish("demo", job_id, JobFinish(state="cancelled", reason="cancelled by request"))
    _wait_for_statuses(mlflow_uri, {parent: "KILLED", child: "KILLED"})


def test_the_time_budget_holds_when_a_family_is_slow(live: tuple[LiveApi, Client], tmp_path: Path) -> None:
    """timeout_s is a hard limit: a random forest whose first fits show it would end past the
    deadline stops there (pruned, saying so), one still fitting at the deadline is stopped (failed,
    over the budget), and the job registers the best model it has, within its budget; without the
    limit they would fit for minutes."""
    api, client = live
    client.datasets.upload("demo", slow_dataset(tmp_path / "slow.parquet"))
    budget = 25
    job = client.jobs.create(
        "demo", dataset="slow", target="label", timeout_s=budget, families=["linear", "random_forest"], seed=0
    )
    began = time.monotonic()
    done = run_job(api.worker_client(), api.settings, job.id, "demo")
    took = time.monotonic() - began
    assert done is not None and done.state == "succeeded", done
    assert took < budget + 30, took  # the forests alone take minutes (slow_dataset)
    stopped = [
        t
        for t in done.leaderboard
        if t.error == "stopped: over the time budget" or "past the time budget" in str(t.error)
    ]
    assert "random_forest" in {t.family for t in stopped}  # (near the deadline, a linear trial may be too)
    assert {t.state for t in stopped} <= {"fail", "pruned"}
    assert all(t.state == "pruned" for t in stopped if "past the time budget" in str(t.error))
    logs = " ".join(line.message for line in client.jobs.logs("demo", job.id))
    assert "trials fit on a sample of 25000 of the 40000 training rows" in logs, logs
    # The model learnt from more rows than the trials' sample: every row when the budget left time
    # for that fit (on a busy machine it may not), else as many as it left, else the last rung's
    # fit (on 32,500 training rows); the log says which.
    trained = MlflowClient(api.settings.mlflow_uri).get_run(str(done.mlflow_run_id)).data.params["best.training_rows"]
    said = {
        "50000": "final fit on all 50000 rows",
        "32500": "learnt from 32500 training rows is registered",
    }.get(trained, f"final fit on {trained} of the 50000 rows")
    assert int(trained) > 25_000 and said in logs, (trained, logs)
