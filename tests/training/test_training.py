"""Pure ML: each family, task detection, preprocessing, and models that load back from MLflow."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.datasets import load_diabetes

from miniml.data.formats import detect
from miniml.data.profiles import profile_table
from miniml.domain.tasks import Task, detect_task
from miniml.tracking.runs import Tracker
from miniml.tracking.signing import load_verified
from miniml.training.data import Features, coerce, features_from_profile, load_frame, split
from miniml.training.families import FAMILIES
from miniml.training.search import (
    SearchControl,
    SearchSpec,
    TrialResult,
    best_trial,
    holdout_metrics,
    make_storage,
    new_study,
    refit,
    run_search,
)

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


def prepare(path: Path, target: str, task: Task | None = None):  # type: ignore[no-untyped-def]
    table = detect(path)
    profile = profile_table(table)
    col = next(c for c in profile["columns"] if c["name"] == target)
    task = task or detect_task(col, profile["rows"])
    features = features_from_profile(profile, target)
    data = split(load_frame(table), features, target, task, test_size=0.25, seed=0)
    return data, features, task


def search(
    tmp_path: Path,
    data,
    features: Features,
    task: Task,
    families: list[str],
    trials: int,
    metric: str | None = None,
    trial_rows: int | None = None,
    n_jobs: int = 2,
    seed: int = 0,
):  # type: ignore[no-untyped-def]
    lock = threading.Lock()
    claimed = [0]
    results: list[TrialResult] = []

    def claim() -> bool:
        with lock:
            if claimed[0] >= trials:
                return False
            claimed[0] += 1
            return True

    spec = SearchSpec(
        task=task,
        metric=metric or ("f1_macro" if task is Task.classification else "rmse"),
        families=families,
        n_jobs=n_jobs,
        cv_folds=3,
        trial_rows=trial_rows,
        seed=seed,
    )
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    run_search(storage, "s", data, features, spec, SearchControl(claim=claim, on_trial=results.append))
    study = new_study(storage, "s", spec)
    return study, spec, results


def write_csv(tmp_path: Path, frame: pd.DataFrame, name: str) -> Path:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def diabetes_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ds = load_diabetes(as_frame=True)
    frame = ds.frame.rename(columns={"target": "progression"})
    return write_csv(tmp_path_factory.mktemp("d"), frame, "diabetes.csv")


def test_the_api_and_the_console_offer_every_family_in_cost_order() -> None:
    """The api (which does not import the training code) and the console list the families by
    hand: a family added to FAMILIES and not to them could never be asked for."""
    from miniml.console.pages import FAMILIES as CONSOLE
    from miniml.services.jobs import ALL_FAMILIES

    assert sorted(ALL_FAMILIES) == sorted(FAMILIES)
    assert list(FAMILIES) == CONSOLE


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_each_family_trains_and_loads_back_from_mlflow(
    family: str, task: str, tmp_path: Path, diabetes_csv: Path, mlflow_uri: str
) -> None:
    if task == "classification":
        data, features, t = prepare(IRIS, "target")
    else:
        data, features, t = prepare(diabetes_csv, "progression")
    study, spec, results = search(tmp_path, data, features, t, [family], trials=2)
    assert len(results) == 2 and {r.family for r in results} == {family}
    best = best_trial(study)
    assert best is not None, [r.error for r in results]
    pipe, fam = refit(best, data, features, spec)
    metrics = holdout_metrics(pipe, data, t)
    if t is Task.classification:
        assert metrics["accuracy"] > 0.6
    else:
        baseline = math.sqrt(np.mean((data.y_test - data.y_train.mean()) ** 2))
        assert metrics["rmse"] < baseline * 1.05
    tracker = Tracker(mlflow_uri)
    run = tracker.start_job_run("fam", 1, {})
    name = f"fam.{family}-{task}"
    key = b"k" * 32
    version = tracker.log_model(
        run, pipe, fam, data.x_test.head(3), registered=name, params=best.params, metrics=metrics, signing_key=key
    )
    # Every family round-trips through the signed path the inference service takes.
    loaded, signature = load_verified(mlflow_uri, name, version, key)
    assert signature is not None and list(signature.inputs.input_names()) == list(data.x_test.columns)
    assert list(loaded.predict(data.x_test.head(3))) == list(pipe.predict(data.x_test.head(3)))


def test_iris_keeps_string_labels_and_scores_well(tmp_path: Path) -> None:
    data, features, task = prepare(IRIS, "target")
    assert task is Task.classification
    study, spec, _ = search(
        tmp_path, data, features, task, ["linear", "random_forest", "hist_gradient_boosting"], trials=6
    )
    pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
    assert holdout_metrics(pipe, data, task)["f1_macro"] >= 0.9
    assert set(pipe.predict(data.x_test)) <= {"Iris-setosa", "Iris-versicolor", "Iris-virginica"}


def test_regression_beats_the_mean_predictor(tmp_path: Path, diabetes_csv: Path) -> None:
    data, features, task = prepare(diabetes_csv, "progression")
    assert task is Task.regression
    study, spec, _ = search(tmp_path, data, features, task, ["linear", "hist_gradient_boosting"], trials=6)
    pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
    mean_rmse = math.sqrt(float(np.mean((data.y_test - data.y_train.mean()) ** 2)))
    assert holdout_metrics(pipe, data, task)["rmse"] < mean_rmse


def test_categorical_and_missing_values_and_unseen_categories(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 400
    color = rng.choice(["red", "green", "blue", "rare1"], size=n, p=[0.4, 0.3, 0.295, 0.005])
    size = rng.normal(10, 3, n)
    size[rng.random(n) < 0.1] = np.nan
    label = np.where((color == "red") | (np.nan_to_num(size) > 12), "yes", "no")
    frame = pd.DataFrame({"color": color, "size": size, "label": label})
    frame.loc[rng.random(n) < 0.05, "color"] = None
    path = write_csv(tmp_path, frame, "cats.csv")
    data, features, task = prepare(path, "label")
    assert features.categorical == ["color"] and features.numeric == ["size"]
    for family in ("linear", "lightgbm", "xgboost", "torch_mlp"):
        (tmp_path / family).mkdir()
        study, spec, _ = search(tmp_path / family, data, features, task, [family], trials=1)
        pipe, _ = refit(best_trial(study), data, features, spec)  # type: ignore[arg-type]
        odd = coerce(pd.DataFrame({"color": ["purple", None, "red"], "size": [np.nan, 11.0, None]}), features)
        assert set(pipe.predict(odd)) <= {"yes", "no"}


def test_text_columns_are_left_out_and_booleans_used() -> None:
    profile = {
        "rows": 10,
        "columns": [
            {"name": "id_text", "kind": "text"},
            {"name": "flag", "kind": "boolean"},
            {"name": "when", "kind": "datetime"},
            {"name": "y", "kind": "numeric"},
        ],
    }
    features = features_from_profile(profile, "y")
    assert features.numeric == ["flag"] and set(features.dropped) == {"id_text", "when"}


@pytest.mark.parametrize(
    ("profile", "expected"),
    [
        ({"kind": "categorical", "distinct_count": 3}, Task.classification),
        ({"kind": "numeric", "distinct_count": 3, "integer": True}, Task.classification),
        ({"kind": "numeric", "distinct_count": 3, "integer": False}, Task.regression),
        ({"kind": "numeric", "distinct_count": 200, "integer": True}, Task.regression),
    ],
)
def test_task_detection(profile: dict[str, object], expected: Task) -> None:
    assert detect_task(profile, 1000) is expected


def test_parallel_trials_draw_distinct_configurations(tmp_path: Path, diabetes_csv: Path) -> None:
    """Four trial threads sharing one study: no two trials try the same configuration."""
    data, features, task = prepare(diabetes_csv, "progression")
    lock = threading.Lock()
    claimed = [0]
    results: list[TrialResult] = []

    def claim() -> bool:
        with lock:
            claimed[0] += 1
            return claimed[0] <= 12

    spec = SearchSpec(task=task, metric="rmse", families=["linear", "random_forest"], n_jobs=4, cv_folds=2)
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    run_search(storage, "distinct", data, features, spec, SearchControl(claim=claim, on_trial=results.append))
    configurations = [(r.family, tuple(sorted(r.params.items()))) for r in results]
    assert len(configurations) == 12
    assert len(set(configurations)) == 12, configurations


def test_a_seeded_search_on_one_trial_thread_repeats_its_leaderboard(tmp_path: Path, diabetes_csv: Path) -> None:
    """One trial thread: the same seed gives the same trials (configurations and scores), another
    seed other ones. (With several threads, which thread draws what depends on timing: concepts.md.)"""
    data, features, task = prepare(diabetes_csv, "progression")
    runs = {}
    for name, seed in [("first", 3), ("again", 3), ("other", 4)]:
        (tmp_path / name).mkdir()
        _study, _spec, results = search(
            tmp_path / name, data, features, task, ["linear", "lightgbm"], trials=8, n_jobs=1, seed=seed
        )
        runs[name] = [(r.number, r.family, r.params, r.score) for r in sorted(results, key=lambda r: r.number)]
    assert len(runs["first"]) == 8
    assert runs["again"] == runs["first"]
    # Past the defaults (trials 0 and 1, the same for every seed) the sampler's draws differ.
    assert [r[2] for r in runs["other"][2:]] != [r[2] for r in runs["first"][2:]]


def test_a_search_starts_from_each_familys_defaults_cheapest_first(tmp_path: Path, diabetes_csv: Path) -> None:
    """The first trials are the learners' own defaults, one per family, in order of cost; then the
    sampler explores (the trial after them is none of the defaults)."""
    data, features, task = prepare(diabetes_csv, "progression")
    families = ["random_forest", "linear", "lightgbm"]
    _study, _spec, results = search(tmp_path, data, features, task, families, trials=4)
    ordered = sorted(results, key=lambda r: r.number)
    assert [r.family for r in ordered[:3]] == ["linear", "lightgbm", "random_forest"]
    for r in ordered[:3]:
        defaults = {k.split(".", 1)[1]: v for k, v in FAMILIES[r.family].defaults}
        assert {k.split(".", 1)[1]: v for k, v in r.params.items()}.items() <= defaults.items(), r
    explored = ordered[3]
    family = FAMILIES[explored.family]
    assert explored.params not in (
        dict(family.defaults),
        {**dict(family.defaults), **dict(family.largest)},  # grown defaults: only when trials fit on a sample
    )


def test_when_trials_fit_on_a_sample_the_boosters_defaults_grown_come_next(tmp_path: Path, diabetes_csv: Path) -> None:
    """More rows favour larger models: when trials see a sample, each family's defaults are
    followed by the same grown to the family's largest size (families with sizes, cheapest first)."""
    data, features, task = prepare(diabetes_csv, "progression")
    families = ["random_forest", "linear", "lightgbm"]
    _study, _spec, results = search(tmp_path, data, features, task, families, trials=6, trial_rows=200)
    assert len(data.x_train) > 200
    ordered = sorted(results, key=lambda r: r.number)
    assert [r.family for r in ordered[:5]] == ["linear", "lightgbm", "random_forest", "lightgbm", "random_forest"]
    for r in ordered[3:5]:
        family = FAMILIES[r.family]
        want = {**dict(family.defaults), **dict(family.largest)}
        assert r.params == want, r
    assert ordered[5].number == 5


def test_the_rungs_grow_within_fold_zero_and_keep_every_class_in_proportion() -> None:
    from miniml.training.search import MIN_RUNG_ROWS, RUNG_FRACTIONS, fidelity_rungs

    spec = SearchSpec(task=Task.classification, metric="f1_macro", families=["linear"])
    y = np.array(["rare"] * 300 + ["common"] * 29_700)
    train_idx = np.arange(0, 30_000, 2)  # a fold's training rows: every other row
    rungs = fidelity_rungs(train_idx, y, spec)
    assert [len(r) for r in rungs] == [int(len(train_idx) * f) for f in RUNG_FRACTIONS]
    assert set(rungs[0]) <= set(rungs[1]) <= set(train_idx)
    for rows in rungs:  # 1 % rare in the fold, 1 % rare in each rung (within a row)
        assert abs((y[rows] == "rare").sum() - 0.01 * len(rows)) <= 1
    small = np.arange(int(MIN_RUNG_ROWS / RUNG_FRACTIONS[0]) - 1)
    assert fidelity_rungs(small, y, spec) == []  # small data fits whole


def test_successive_halving_cuts_a_trial_behind_the_best_third_of_its_rung() -> None:
    import optuna

    from miniml.training.search import MIN_COMPETITORS, FidelityPruner

    study = optuna.create_study(direction="maximize", pruner=FidelityPruner(protected=2))

    def at_rung(value: float) -> tuple[optuna.Trial, bool]:
        trial = study.ask()
        trial.report(value, 0)
        return trial, trial.should_prune()

    # The protected defaults and the first trials are never cut: too few to rank against.
    for value in [0.1, 0.2] + [0.5] * (MIN_COMPETITORS - 2):
        trial, cut = at_rung(value)
        assert not cut, value
        study.tell(trial, value)
    # Ranked against the others at the rung: the best third goes on, the rest stop.
    assert at_rung(0.9)[1] is False
    assert at_rung(0.3)[1] is True
    assert at_rung(float("nan"))[1] is True
    minimise = optuna.create_study(direction="minimize", pruner=FidelityPruner(protected=0))
    for value, cut in ((10.0, False), (20.0, False), (30.0, False), (40.0, True), (5.0, False), (12.0, True)):
        trial = minimise.ask()  # lower is better (rmse); the first three have too few to rank against
        trial.report(value, 0)
        assert trial.should_prune() is cut, value


def test_large_data_is_searched_by_data_size_and_small_data_fits_whole(tmp_path: Path) -> None:
    """Each trial on 30,000 rows reports its rungs (a ninth, a third of fold 0) before the folds; on
    iris it only reports folds. Trials cut at a rung say how many rows they got."""
    from sklearn.datasets import make_classification

    from miniml.training.search import FULL_STEP

    x, y = make_classification(n_samples=40_000, n_features=8, n_informative=3, flip_y=0.2, random_state=0)
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]).assign(label=np.array(["a", "b"])[y])
    data, features, task = prepare(write_csv(tmp_path, frame, "big.csv"), "label")
    study, _spec, results = search(tmp_path, data, features, task, ["linear", "hist_gradient_boosting"], trials=10)
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == optuna_complete()]
    assert complete and all(min(t.intermediate_values) == 0 for t in complete)
    assert all(set(t.intermediate_values) == {*range(FULL_STEP), *range(FULL_STEP, FULL_STEP + 3)} for t in complete)
    for r in results:
        if r.state == "pruned" and r.error and "rows" in r.error:
            assert "pruned on" in r.error
    iris_data, iris_features, iris_task = prepare(IRIS, "target")
    (tmp_path / "iris").mkdir()
    small, _spec, _results = search(tmp_path / "iris", iris_data, iris_features, iris_task, ["linear"], trials=2)
    assert all(set(t.intermediate_values) <= set(range(FULL_STEP, FULL_STEP + 3)) for t in small.get_trials())


def optuna_complete():  # type: ignore[no-untyped-def]
    import optuna

    return optuna.trial.TrialState.COMPLETE


def test_a_configuration_is_never_tried_twice_even_when_the_space_runs_out(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A family with three configurations and a budget of ten trials on two threads: TPE proposes
    points again; each repeat is skipped unfitted and off the leaderboard, and once only repeats
    come, the search ends with the three."""
    from dataclasses import replace

    import optuna
    from sklearn.linear_model import LogisticRegression

    from miniml.training import families
    from miniml.training import search as search_module

    def tiny(trial, task, seed):  # type: ignore[no-untyped-def]
        return LogisticRegression(C=trial.suggest_categorical("tiny.C", [0.1, 1.0, 10.0]), max_iter=500)

    tiny_family = replace(families.FAMILIES["linear"], name="tiny", build=tiny, defaults=())
    monkeypatch.setitem(families.FAMILIES, "tiny", tiny_family)
    monkeypatch.setattr(search_module, "MAX_REPEATS", 15)
    data, features, task = prepare(IRIS, "target")
    study, _spec, results = search(tmp_path, data, features, task, ["tiny"], trials=10)
    configurations = [(r.family, tuple(sorted(r.params.items()))) for r in results]
    assert sorted(configurations) == sorted({("tiny", (("tiny.C", c),)) for c in (0.1, 1.0, 10.0)})
    repeats = [t for t in study.trials if "duplicate_of" in t.user_attrs]
    assert repeats and all(t.state == optuna.trial.TrialState.PRUNED for t in repeats)


def _ring(tmp_path: Path):  # type: ignore[no-untyped-def]
    """30,000 rows whose label follows a ring and a threshold: a curve a linear model cannot learn."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(30_000, 4))
    label = np.where((x[:, 0] ** 2 + x[:, 1] ** 2 > 1.4) ^ (x[:, 2] > 0.8), "out", "in")
    frame = pd.DataFrame(x, columns=["a", "b", "c", "d"]).assign(label=label)
    return prepare(write_csv(tmp_path, frame, "ring.csv"), "label")


# LightGBM's defaults the search's best, a linear model next.
_BOOSTED: list[tuple[dict[str, object], float]] = [
    ({"family": "lightgbm", **dict(FAMILIES["lightgbm"].defaults)}, 0.90),
    ({"family": "linear", "linear.C": 0.01}, 0.80),
]


def _studied(done: list[tuple[dict[str, object], float]]):  # type: ignore[no-untyped-def]
    """A study with these trials done (the search's, as far as the last rung reads them)."""
    import optuna

    study = optuna.create_study(direction="maximize")
    for params, value in done:
        study.add_trial(
            optuna.trial.create_trial(
                params=params,
                distributions={k: optuna.distributions.CategoricalDistribution([v]) for k, v in params.items()},
                value=value,
                user_attrs={"fit_s_per_row": 1e-6},
            )
        )
    return study


def test_the_last_rung_ranks_the_best_few_on_rows_no_trial_saw(tmp_path: Path) -> None:
    """Trials fit on a sample: the best three by cross-validation (each booster also grown to its
    family's largest size) refit on three times as many rows and are ranked on training rows outside both. A
    configuration the sample flattered (here a linear model given the best CV score by hand) loses
    to one that learns the data's curve."""
    from miniml.training.search import PROMOTED, promote, promotion_rows, trial_sample

    data, features, task = _ring(tmp_path)
    spec = SearchSpec(task=task, metric="f1_macro", families=["linear", "lightgbm"], trial_rows=3_000)
    configurations = [
        ({"family": "linear", "linear.C": 1.0}, 0.99),  # flattered on the sample
        *_BOOSTED,
        ({"family": "linear", "linear.C": 10.0}, 0.70),  # not among the best three: never refit
    ]
    studied = _studied
    study = studied(configurations)
    fit_rows, valid_rows = promotion_rows(data, spec)
    assert fit_rows == 9_000 and valid_rows == min(100_000, (len(data.x_train) - 3_000) // 2)
    rows = len(data.x_train) * 2
    # Time enough for every candidate, however loaded the machine (a loaded one made the plan skip
    # the grown LightGBM with 300 s: its fit, then its final fit, planned from a slow fit here).
    ample = 3_600
    rung = promote(study, data, features, spec, end=time.monotonic() + ample, final_rows=rows)
    assert [p.trial.number for p in rung.ranked if p.trial] == list(range(PROMOTED))
    # The one booster among them is also fit grown, right after itself; the linear models have no size.
    assert [(p.trial.number if p.trial else f"{p.base.number} grown") for p in rung.ranked] == [0, 1, "1 grown", 2]
    assert rung.winner is not None and rung.winner.params["family"] == "lightgbm"
    # The winner's fit here is the held-out model: fitted on the rung's rows, its final fit planned.
    assert rung.pipe is not None and rung.pipe.predict(data.x_test).shape == (len(data.x_test),)
    assert rung.pipe is next(p.pipe for p in rung.ranked if p.params == rung.winner.params)
    assert 1.0 < rung.final_s < 300
    assert max(rung.ranked, key=lambda p: p.score).params["family"] == "lightgbm" and rung.ranked[1].score > 0.9
    assert (rung.fit_rows, rung.valid_rows) == (fit_rows, valid_rows)
    sample = trial_sample(data, spec)
    assert sample is not None and len(sample) == 3_000
    # No time: only the search's own best is fit (the held-out model, in place of a costlier fit on
    # the whole training split), and it stands.
    late = promote(study, data, features, spec, end=time.monotonic(), final_rows=rows)
    assert [p.trial.number for p in late.ranked if p.trial] == [0] and len(late.ranked) == 1
    assert late.winner is not None and late.winner.number == 0 and late.pipe is late.ranked[0].pipe
    # Trials on every row: there is no larger rung.
    whole = SearchSpec(task=task, metric="f1_macro", families=["linear"], trial_rows=None)
    assert promotion_rows(data, whole) == (0, 0)
    assert promote(study, data, features, whole, end=time.monotonic() + ample, final_rows=rows).winner is None

    # The best trial a booster's defaults: the same grown to its family's largest size is ranked too,
    # and joins the study as a trial of its own when it wins.
    boosted = studied(_BOOSTED)
    largest = dict(FAMILIES["lightgbm"].largest)
    rung = promote(boosted, data, features, spec, end=time.monotonic() + ample, final_rows=rows)
    (big,) = [p for p in rung.ranked if p.trial is None]
    assert {k: big.params[k] for k in largest} == largest and big.params["family"] == "lightgbm"
    assert rung.winner is not None
    if rung.winner.params == big.params:
        assert rung.winner.user_attrs["grown_from"] == 0 and len(boosted.trials) == 3


def test_a_grown_candidate_is_fit_while_the_leaders_final_fit_still_fits_and_wins_only_if_its_own_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The plan for a grown configuration's own final fit is a guess from its size (and runs high),
    so the last rung fits it whenever the leader's final fit still fits after it; it wins only if its
    final fit, planned from its fit there, fits too. A clock that moves only as each fit says (1 s
    for LightGBM's defaults, 2 s grown, 0.1 s a linear model) makes the plan exact: the leader's
    final fit on 10 times the rung's rows is 12.5 s, the grown fit is planned at 7.8 s (its own final
    fit, planned like a trial's, at 78 s), and once fit its final fit is 24 s."""
    from miniml.training import search as search_module
    from miniml.training.search import promote, promotion_rows

    data, features, task = _ring(tmp_path)
    spec = SearchSpec(task=task, metric="f1_macro", families=["linear", "lightgbm"], trial_rows=3_000)
    fit_rows, _ = promotion_rows(data, spec)
    clock = [1_000.0]
    monkeypatch.setattr(search_module, "time", type("Clock", (), {"monotonic": staticmethod(lambda: clock[0])}))
    real_build = search_module.build_pipeline

    def timed_build(features: Features, family: object, estimator: object):  # type: ignore[no-untyped-def]
        pipe = real_build(features, family, estimator)  # type: ignore[arg-type]
        fit = pipe.fit
        trees = estimator.get_params().get("n_estimators")  # type: ignore[attr-defined]

        def timed_fit(x: object, y: object) -> object:
            out = fit(x, y)
            clock[0] += {None: 0.1, 100: 1.0, 300: 2.0}[trees]
            return out

        pipe.fit = timed_fit  # type: ignore[method-assign]
        return pipe

    monkeypatch.setattr(search_module, "build_pipeline", timed_build)

    def rung(seconds: float, overrun: float = 0.0):  # type: ignore[no-untyped-def]
        end = clock[0] + seconds
        return promote(
            _studied(_BOOSTED), data, features, spec, end=end, final_rows=10 * fit_rows, final_end=end + overrun
        )

    def fit(r) -> list[str]:  # type: ignore[no-untyped-def]
        return [p.params["family"] + (" grown" if p.trial is None else "") for p in r.ranked]

    # 40 s: every candidate is fit (the plan that asked for the grown one's own final fit, 7.8 + 78 s,
    # fit only the others), and the best wins: every final fit fits.
    roomy = rung(40)
    assert fit(roomy) == ["lightgbm", "lightgbm grown", "linear"]
    best = max(roomy.ranked, key=lambda p: p.score)
    assert roomy.winner is not None and roomy.winner.params == best.params
    assert roomy.pipe is best.pipe and roomy.final_s == pytest.approx(best.fit_s * 10 * 1.15 + 1.0)
    # 26 s: the grown one is fit (1 + 7.8 + 12.5 s), but its final fit (24 s, from 3 s on) would end
    # past the budget, so it cannot win whatever it scored.
    tight = rung(26)
    # The linear model is fit after it whatever the grown one scored: the plan's leader is the best
    # whose final fit still fits (not a grown one that cannot be finalised).
    assert fit(tight) == ["lightgbm", "lightgbm grown", "linear"]
    measured = max((p for p in tight.ranked if p.trial is not None), key=lambda p: p.score)
    assert tight.winner is not None and tight.winner.params == measured.params
    # Allowed to overrun by 4 s (a job's tenth of its budget), the best wins, the grown one too.
    overrun = rung(26, overrun=4)
    assert fit(overrun)[:2] == ["lightgbm", "lightgbm grown"]
    best = max(overrun.ranked, key=lambda p: p.score)
    assert overrun.winner is not None and overrun.winner.params == best.params
    # 15 s: after the defaults' fit, the grown fit would leave no time for the leader's final fit.
    short = rung(15)
    assert fit(short) == ["lightgbm"] and short.winner is not None and short.winner.params == _BOOSTED[0][0]


@pytest.mark.parametrize("share", [0.35, 0.0])
def test_when_trials_fit_on_a_sample_a_share_of_the_budget_is_kept_for_the_last_rung(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, share: float
) -> None:
    """On a sample, no trial starts in the last LAST_RUNG_SHARE of the budget (kept for the last rung
    and the final fit, whatever the best trial's own fits would need); with no share kept (the
    failing case) cheap trials go on to the budget's end."""
    import datetime

    from miniml.training import search as search_module

    monkeypatch.setattr(search_module, "LAST_RUNG_SHARE", share)
    data, features, task = _ring(tmp_path)
    budget = 6.0
    spec = SearchSpec(task=task, metric="f1_macro", families=["linear"], trial_rows=3_000, timeout_s=budget, n_jobs=2)
    storage = make_storage(f"sqlite:///{tmp_path / 'optuna.db'}")
    began = datetime.datetime.now()
    run_search(storage, "s", data, features, spec, SearchControl(claim=lambda: True, on_trial=lambda _: None))
    import optuna

    starts = [
        (t.datetime_start - began).total_seconds()
        for t in optuna.load_study(study_name="s", storage=storage).trials
        if t.datetime_start is not None
    ]
    kept = search_module.LAST_RUNG_SHARE * budget
    assert len(starts) > 3
    if share:
        assert max(starts) < budget - kept + 1.5  # (a trial starts a moment after the deadline check)
    else:
        assert max(starts) > budget - 0.35 * budget + 1.0


def test_a_trial_whose_remaining_fits_would_pass_the_deadline_stops_at_once(tmp_path: Path) -> None:
    """After its first rung, a random forest on 30,000 rows shows what its row costs: with a second
    left it is stopped there, pruned and saying why; a cheap model with time to spare completes."""
    import optuna

    from miniml.training.search import SearchControl, make_objective

    x = np.random.default_rng(0).normal(size=(30_000, 6))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(6)]).assign(label=np.where(x[:, 0] > 0, "a", "b"))
    data, features, task = prepare(write_csv(tmp_path, frame, "wide.csv"), "label")

    def run(family: str, seconds: float) -> optuna.trial.FrozenTrial:
        spec = SearchSpec(task=task, metric="f1_macro", families=[family], seed=0)
        end = time.monotonic() + seconds
        objective = make_objective(
            data, features, spec, SearchControl(claim=lambda: True, on_trial=lambda r: None), deadline=lambda: end
        )
        study = optuna.create_study(direction="maximize")
        study.enqueue_trial({"family": family, **dict(FAMILIES[family].defaults)})
        study.optimize(objective, n_trials=1)
        return study.trials[0]

    started = time.monotonic()
    slow = run("random_forest", 1.0)
    assert slow.state == optuna.trial.TrialState.PRUNED
    assert "past the time budget" in str(slow.user_attrs["error"]) and len(slow.intermediate_values) == 1
    assert time.monotonic() - started < 30  # the whole forest would take far longer
    cheap = run("linear", 600)
    assert cheap.state == optuna.trial.TrialState.COMPLETE and "error" not in cheap.user_attrs


def test_an_mlp_fitting_past_the_deadline_stops_within_a_few_mini_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At the search's deadline the trials still fitting are stopped; an MLP's fit (here 120 epochs
    of 200 mini-batches, many seconds) ends within STOP_CHECK_STEPS mini-batches, so its thread does
    not outlive the search (left fitting, it held the GIL and the cores the last rung and the final
    fit need)."""
    import optuna

    from miniml.training.search import OverBudget, make_objective

    x = np.random.default_rng(0).normal(size=(13_000, 8))
    frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]).assign(label=np.where(x[:, 0] > 0, "a", "b"))
    data, features, task = prepare(write_csv(tmp_path, frame, "mlp.csv"), "label")
    spec = SearchSpec(task=task, metric="f1_macro", families=["torch_mlp"])
    over = threading.Event()
    objective = make_objective(data, features, spec, SearchControl(claim=lambda: True, on_trial=lambda _: None), over)
    study = optuna.create_study(direction="maximize")
    slow = {**dict(FAMILIES["torch_mlp"].defaults), "torch_mlp.epochs": 120, "torch_mlp.batch_size": 32}
    study.enqueue_trial({"family": "torch_mlp", **slow})
    from miniml.training import estimators

    asked: list[bool] = []  # each check the fit made between mini-batches, and its answer
    real_check = estimators._stop_requested
    monkeypatch.setattr(estimators, "_stop_requested", lambda: asked.append(real_check()) or asked[-1])
    timer = threading.Timer(1.0, over.set)
    timer.start()
    with pytest.raises(OverBudget):
        study.optimize(objective, n_trials=1)
    timer.join()
    # It stopped at the first check after the deadline, long before the fold's fit would have ended
    # (120 epochs of 204 mini-batches: 600 checks). Counted, not timed: a loaded machine is slower.
    assert over.is_set() and asked[-1] and asked.count(True) == 1 and len(asked) < 600


def test_a_fit_asked_to_stop_raises_fit_stopped_and_others_are_left_alone() -> None:
    from miniml.training.estimators import FitStopped, TorchMLP, stoppable

    x = np.random.default_rng(0).normal(size=(2_000, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    with stoppable(lambda: True), pytest.raises(FitStopped):
        TorchMLP(task="classification", epochs=50).fit(x, y)
    with stoppable(lambda: False):
        assert TorchMLP(task="classification", epochs=1).fit(x, y).predict(x[:5]).shape == (5,)
    assert TorchMLP(task="classification", epochs=1).fit(x, y).n_outputs_ == 2  # outside a block: no check


@pytest.mark.parametrize("labels", [["setosa", "versicolor", "virginica"], [3, 1, 2], ["b", "a"]])
def test_held_out_metrics_from_one_prediction_match_scikit_learns(labels: list[object]) -> None:
    """The held-out metrics compare labels as codes from one predict and one predict_proba: they
    must be scikit-learn's own figures, for text and number labels, two classes or more."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    from miniml.training.data import Split
    from miniml.training.search import scores

    rng = np.random.default_rng(1)
    x = pd.DataFrame(rng.normal(size=(600, 3)), columns=["a", "b", "c"])
    y = np.array(labels)[(x["a"] + rng.normal(0, 0.8, 600) > 0).astype(int) + (x["b"] > 1) * (len(labels) > 2)]
    from sklearn.pipeline import make_pipeline

    model = make_pipeline(LogisticRegression()).fit(x[:400], y[:400])
    xt, yt = x[400:], y[400:]
    got = holdout_metrics(model, Split(x[:400], x[400:], y[:400], yt), Task.classification)  # type: ignore[arg-type]
    proba, pred = model.predict_proba(xt), model.predict(xt)
    auc = (
        roc_auc_score(yt, proba[:, 1])
        if len(labels) == 2
        else roc_auc_score(yt, proba, multi_class="ovr", labels=model.classes_)
    )
    want = {
        "f1_macro": f1_score(yt, pred, average="macro"),
        "accuracy": accuracy_score(yt, pred),
        "roc_auc": auc,
        "log_loss": log_loss(yt, proba, labels=model.classes_),
    }
    assert got.keys() == want.keys() and all(math.isclose(got[k], want[k], rel_tol=1e-9) for k in want), (got, want)
    assert 0.5 < got["accuracy"] < 1.0  # a model that errs: the codes must line up with the labels
    assert scores(["accuracy"], model, xt, yt) == {"accuracy": got["accuracy"]}


def test_a_final_fit_short_of_time_learns_from_a_stratified_sample_of_every_row() -> None:
    """The final fit on ``rows`` of the training and test rows together: exactly that many, drawn
    from both, every class kept (a rare one too); without ``rows``, all of them."""
    from miniml.training.data import Split
    from miniml.training.search import _fit_all

    class Spy:
        def fit(self, x: pd.DataFrame, y: np.ndarray) -> None:
            self.x, self.y = x, y

    rng = np.random.default_rng(0)
    y = np.where(rng.random(10_000) < 0.01, "rare", "common")
    x = pd.DataFrame({"a": np.arange(10_000)})
    data = Split(x.iloc[:8_000], x.iloc[8_000:], y[:8_000], y[8_000:])
    spec = SearchSpec(task=Task.classification, metric="f1_macro", families=["linear"])
    spy = Spy()
    _fit_all(spy, data, every_row=True, rows=3_000, spec=spec)  # type: ignore[arg-type]
    assert len(spy.x) == len(spy.y) == 3_000 and spy.x["a"].is_unique
    assert (spy.x["a"] >= 8_000).any() and (spy.x["a"] < 8_000).any()  # from the test rows too
    assert abs((spy.y == "rare").mean() - (y == "rare").mean()) < 0.002
    assert (spy.y == y[spy.x["a"].to_numpy()]).all()  # each row keeps its own label
    _fit_all(spy, data, every_row=True, rows=None, spec=spec)  # type: ignore[arg-type]
    assert len(spy.x) == 10_000
