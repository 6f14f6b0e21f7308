"""The Optuna search: family first, its parameters next, cross-validated, pruned by data size and per fold.

Trials are claimed one at a time from a budget the caller owns (the api, through the job), so
several threads and several worker processes can share one study and the total number of
trials is exactly the budget.
"""

from __future__ import annotations

import math
import random
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import optuna
import sqlalchemy.exc
from sklearn.compose import ColumnTransformer
from sklearn.impute import SimpleImputer
from sklearn.metrics import (
    f1_score,
    log_loss,
    mean_absolute_error,
    mean_squared_error,
    r2_score,
    roc_auc_score,
)
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from miniml.domain.tasks import Task, maximise
from miniml.errors import public_reason
from miniml.training.data import Features, Split, strata
from miniml.training.estimators import FitStopped, stoppable
from miniml.training.families import FAMILIES, Family, by_cost

# Categories seen in under 1% of rows (and beyond the 50 most frequent) share one "infrequent" column.
RARE_CATEGORY_FRACTION = 0.01
MAX_CATEGORIES = 50


@dataclass
class SearchSpec:
    task: Task
    metric: str
    families: list[str]
    cv_folds: int = 3
    seed: int = 0
    max_trials: int | None = None
    timeout_s: float | None = None
    n_jobs: int = 1
    # Which of a parallel job's worker processes this is: each samples from its own seed.
    shard: int = 0
    # Rows the final fits will see: the time they take is kept back from ``timeout_s``.
    final_fit_rows: int = 0
    # Trials fit on at most this many training rows (a stratified sample): data-size fidelity.
    trial_rows: int | None = None


# A final fit is planned at this multiple of its per-row cost in the trials (plus a second).
FINAL_FIT_MARGIN = 1.5
# ... and at this multiple of its per-row cost in the last rung's fit, which ran alone as it will.
RUNG_FIT_MARGIN = 1.15

# Data-size fidelity, successive halving as in ASHA: when a fold trains on at least
# MIN_RUNG_ROWS / RUNG_FRACTIONS[0] rows, a trial first fits on these fractions of fold 0's training
# rows (its rungs, steps 0, 1, ...) and goes on only while it is in the top 1/REDUCTION of the trials
# that reached the same rung; then it fits every fold on all the rows (steps FULL_STEP + fold), where
# the median rule prunes it.
RUNG_FRACTIONS = (1 / 9, 1 / 3)
MIN_RUNG_ROWS = 1_000
FULL_STEP = len(RUNG_FRACTIONS)
REDUCTION = 3
# A rung prunes only once this many other trials have reached it.
MIN_COMPETITORS = 3
# A trial thread stops once the sampler proposed configurations already tried this many times in a row.
MAX_REPEATS = 50
# The last rung, when trials fit on a sample of the training rows: the PROMOTED best configurations
# fit on PROMOTION_FACTOR times the trials' rows and are ranked on up to PROMOTION_VALID_ROWS
# training rows no trial saw. What wins on a sample is not always what wins on all the data
# (more rows favour larger models), so the winner is chosen nearer the final fit's size.
PROMOTED = 3
PROMOTION_FACTOR = 3
PROMOTION_VALID_ROWS = 100_000
# When trials fit on a sample, at least this share of the time budget is kept from the trials for
# the last rung and the final fit: once the defaults have run, more rows and larger models gain
# more than more trials on the sample do (2,000,000 rows, 120 s: the trials' best stopped moving
# after the first 20 s, and a grown model fit on more rows won).
LAST_RUNG_SHARE = 0.4


def trial_rows_for(timeout_s: float | None) -> int | None:
    """Rows a trial fits on under a time budget: more with more time; every row without a budget."""
    return max(20_000, int(timeout_s * 1_000)) if timeout_s else None


def refit_threads() -> int:
    """The threads a fit that runs alone uses (``trainer.thread_budget`` says; 1 when unset)."""
    import os

    return max(1, int(os.environ.get("MINIML_REFIT_THREADS", "0") or 0))


def alone_factor() -> float:
    """A fit that runs alone (the last rung's, the final ones) on every core, against the trials'
    cost per row (each fit on one core, beside the other trials'): planned at FINAL_FIT_MARGIN over
    a speed-up of cores^0.75 (the boosters do not scale linearly), 8 cores at most."""
    return float(FINAL_FIT_MARGIN / min(refit_threads(), 8) ** 0.75)


def fit_cost(trial: optuna.trial.FrozenTrial, rows: int) -> float:
    """Seconds a fit of ``trial``'s configuration on ``rows`` rows, run alone, should take, from its trial's fits."""
    return float(trial.user_attrs.get("fit_s_per_row", 0.0)) * rows * alone_factor() + 1.0


@dataclass
class TrialResult:
    number: int
    family: str
    params: dict[str, Any]
    score: float | None
    duration_s: float
    state: str
    worker: str
    error: str | None = None


@dataclass
class SearchControl:
    """How the search asks for budget and reports back; the job runner fills these in."""

    claim: Callable[[], bool]
    on_trial: Callable[[TrialResult], None]
    should_stop: Callable[[], bool] = lambda: False
    worker: str = "local"
    errors: list[str] = field(default_factory=list)


def build_pipeline(features: Features, family: Family, estimator: Any) -> Pipeline:
    numeric_steps: list[tuple[str, Any]] = [("impute", SimpleImputer(strategy="median", keep_empty_features=True))]
    if family.scale_numeric:
        numeric_steps.append(("scale", StandardScaler()))
    categorical = Pipeline(
        [
            ("impute", SimpleImputer(strategy="constant", fill_value="__missing__", keep_empty_features=True)),
            (
                "onehot",
                OneHotEncoder(
                    handle_unknown="infrequent_if_exist",
                    min_frequency=RARE_CATEGORY_FRACTION,
                    max_categories=MAX_CATEGORIES,
                    sparse_output=False,
                ),
            ),
        ]
    )
    transformers: list[tuple[str, Any, list[str]]] = []
    if features.numeric:
        transformers.append(("numeric", Pipeline(numeric_steps), features.numeric))
    if features.categorical:
        transformers.append(("categorical", categorical, features.categorical))
    pre = ColumnTransformer(transformers, remainder="drop", verbose_feature_names_out=True)
    return Pipeline([("preprocess", pre), ("model", estimator)])


CLASSIFICATION_METRICS = ("f1_macro", "accuracy", "roc_auc", "log_loss")
REGRESSION_METRICS = ("rmse", "mae", "r2")


def score(metric: str, model: Any, x: Any, y: np.ndarray) -> float:
    return scores([metric], model, x, y)[metric]


def scores(metrics: list[str] | tuple[str, ...], model: Any, x: Any, y: np.ndarray) -> dict[str, float]:
    """``metrics`` of ``model`` on ``(x, y)``, from one ``predict`` and one ``predict_proba``. Labels
    are compared as integer codes (text labels made each metric sort every row's string again)."""
    return _scores(metrics, model, x, y)[0]


def _scores(
    metrics: list[str] | tuple[str, ...], model: Any, x: Any, y: np.ndarray
) -> tuple[dict[str, float], np.ndarray | None]:
    """``scores``, and the predictions when a metric needed them."""
    import pandas as pd

    out: dict[str, float] = {}
    for metric in metrics:
        if metric not in (*CLASSIFICATION_METRICS, *REGRESSION_METRICS):
            raise ValueError(f"unknown metric {metric}")
    if any(m in ("roc_auc", "log_loss") for m in metrics):
        proba = model.predict_proba(x)
        classes = list(model.classes_)
        index = {label: i for i, label in enumerate(classes)}
        codes = np.array([index.get(label, -1) for label in pd.unique(y)])
        y_codes = codes[pd.factorize(y, sort=False)[0]] if len(y) else np.array([], dtype=int)
        if (y_codes < 0).any():
            raise ValueError("the labels hold a class the model never learnt")
        labels = list(range(len(classes)))
        if "log_loss" in metrics:
            out["log_loss"] = float(log_loss(y_codes, proba, labels=labels))
        if "roc_auc" in metrics:
            if len(classes) == 2:
                out["roc_auc"] = float(roc_auc_score(y_codes, proba[:, 1]))
            else:
                out["roc_auc"] = float(roc_auc_score(y_codes, proba, multi_class="ovr", labels=labels))
    rest = [m for m in metrics if m not in ("roc_auc", "log_loss")]
    if not rest:
        return out, None
    pred = np.asarray(model.predict(x))
    if any(m in CLASSIFICATION_METRICS for m in rest):
        # f1 and accuracy depend on which rows agree, not on the labels' names: compare codes.
        both, _ = pd.factorize(np.concatenate([np.asarray(y, dtype=object), np.asarray(pred, dtype=object)]))
        truth, guess = both[: len(y)], both[len(y) :]
        if "f1_macro" in rest:
            out["f1_macro"] = float(f1_score(truth, guess, average="macro"))
        if "accuracy" in rest:
            out["accuracy"] = float(np.mean(truth == guess)) if len(truth) else float("nan")
    if "rmse" in rest:
        out["rmse"] = float(math.sqrt(mean_squared_error(y, pred)))
    if "mae" in rest:
        out["mae"] = float(mean_absolute_error(y, pred))
    if "r2" in rest:
        out["r2"] = float(r2_score(y, pred))
    return out, pred


class Cancelled(Exception):
    pass


OVER_BUDGET = "stopped: over the time budget"


class OverBudget(Exception):
    pass


def make_objective(
    data: Split,
    features: Features,
    spec: SearchSpec,
    control: SearchControl,
    over: threading.Event | None = None,
    deadline: Callable[[], float] | None = None,
) -> Callable[..., float]:
    """The trial's objective: its configuration's cross-validated score, fitted rung by rung.

    ``deadline`` (the search's, in ``time.monotonic()``): after each fit, a trial whose remaining
    fits would end past it, at the cost per row it has shown so far, stops there (pruned, saying
    so) and leaves its thread to cheaper configurations."""
    if spec.task is Task.classification:
        folds: Any = StratifiedKFold(n_splits=spec.cv_folds, shuffle=True, random_state=spec.seed)
    else:
        folds = KFold(n_splits=spec.cv_folds, shuffle=True, random_state=spec.seed)
    keep = trial_sample(data, spec)
    x, y = (data.x_train, data.y_train) if keep is None else (data.x_train.iloc[keep], data.y_train[keep])
    splits = list(folds.split(x, y))
    rungs = fidelity_rungs(splits[0][0], y, spec)

    def objective(trial: optuna.Trial) -> float:
        trial.set_user_attr("worker", control.worker)
        name = trial.suggest_categorical("family", spec.families)
        family = FAMILIES[str(name)]
        family.build(trial, spec.task, spec.seed)  # draws every parameter now: is this configuration new?
        seen = _same_configuration(trial)
        if seen is not None:
            # Ended pruned, unfitted and off the leaderboard; the thread draws again on the same claim.
            # (To TPE a pruned point counts among the poor ones: it is less likely to propose it again.)
            trial.set_user_attr("duplicate_of", seen.number)
            raise optuna.TrialPruned
        fit_s, fit_rows = 0.0, 0
        plan = [len(r) for r in rungs] + [len(train_idx) for train_idx, _ in splits]  # rows of each fit

        def affordable(done: int) -> None:
            """After ``done`` fits: stop here if the rest would end past the deadline."""
            if deadline is None or done >= len(plan):
                return
            need = fit_s / max(1, fit_rows) * sum(plan[done:])
            if time.monotonic() + need > deadline():
                trial.set_user_attr(
                    "error",
                    f"stopped after {fit_rows:,} rows: its remaining fits would need about {need:.0f}s, "
                    "past the time budget",
                )
                raise optuna.TrialPruned

        def fit_and_score(train_idx: np.ndarray, valid_idx: np.ndarray) -> float:
            nonlocal fit_s, fit_rows
            if control.should_stop():
                raise Cancelled
            if over is not None and over.is_set():
                raise OverBudget
            pipe = build_pipeline(features, family, family.build(trial, spec.task, spec.seed))
            started = time.monotonic()
            try:
                with stoppable(lambda: control.should_stop() or (over is not None and over.is_set())):
                    pipe.fit(x.iloc[train_idx], y[train_idx])
            except FitStopped:
                raise (Cancelled if control.should_stop() else OverBudget)() from None
            fit_s, fit_rows = fit_s + time.monotonic() - started, fit_rows + len(train_idx)
            # What a fit of this configuration costs a row: the final fits' time is planned on it.
            trial.set_user_attr("fit_s_per_row", fit_s / max(1, fit_rows))
            return score(spec.metric, pipe, x.iloc[valid_idx], y[valid_idx])

        for step, rows in enumerate(rungs):
            trial.report(fit_and_score(rows, splits[0][1]), step)
            if trial.should_prune():
                trial.set_user_attr("error", f"pruned on {len(rows):,} rows: behind the best third of the trials there")
                raise optuna.TrialPruned
            affordable(step + 1)
        scores: list[float] = []
        for fold, (train_idx, valid_idx) in enumerate(splits):
            scores.append(fit_and_score(train_idx, valid_idx))
            trial.report(float(np.mean(scores)), FULL_STEP + fold)
            if trial.should_prune():
                raise optuna.TrialPruned
            affordable(len(rungs) + fold + 1)
        return float(np.mean(scores))

    return objective


def sampled(data: Split, spec: SearchSpec) -> bool:
    """Whether trials fit on a sample of the training rows (``spec.trial_rows`` of them)."""
    return bool(spec.trial_rows) and len(data.x_train) > int(spec.trial_rows or 0)


def trial_sample(data: Split, spec: SearchSpec) -> np.ndarray | None:
    """The training rows trials fit on (sorted positions, stratified), or None for every row."""
    if not sampled(data, spec):
        return None
    from sklearn.model_selection import train_test_split

    keep, _ = train_test_split(
        np.arange(len(data.x_train)),
        train_size=spec.trial_rows,
        random_state=spec.seed,
        stratify=strata(data.y_train, spec.task),
    )
    return np.sort(keep)


def promotion_rows(data: Split, spec: SearchSpec) -> tuple[int, int]:
    """(rows each promoted configuration fits on, rows it is ranked on); (0, 0) when trials saw every row."""
    if not sampled(data, spec) or spec.trial_rows is None:
        return 0, 0
    unseen = len(data.x_train) - spec.trial_rows
    valid = min(PROMOTION_VALID_ROWS, unseen // 2)
    return min(spec.trial_rows * PROMOTION_FACTOR, len(data.x_train) - valid), valid


@dataclass
class Promoted:
    params: dict[str, Any]
    trial: optuna.trial.FrozenTrial | None  # None: a configuration grown (Family.largest) from ``base``
    score: float
    fit_s: float
    pipe: Pipeline | None = None
    base: optuna.trial.FrozenTrial | None = None


@dataclass
class LastRung:
    winner: optuna.trial.FrozenTrial | None  # None: nothing was fit
    ranked: list[Promoted]
    fit_rows: int
    valid_rows: int
    # The winner's fit here, on ``fit_rows`` training rows: the held-out rows score it, so no second
    # fit on the training split is needed before the one on every row. None when nothing was fit.
    pipe: Pipeline | None = None
    # Seconds the final fit on every row should take, at the cost per row measured here.
    final_s: float = math.inf


def grown(trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
    """``trial``'s configuration with its family's size parameters at their largest, or None."""
    family = FAMILIES[str(trial.params["family"])]
    params = {**trial.params, **dict(family.largest)}
    return params if family.largest and params != trial.params else None


def _size_ratio(small: dict[str, Any], large: dict[str, Any]) -> float:
    """How many times costlier ``large``'s fits should be than ``small``'s: the product of its size
    parameters' growth. A tree's leaves count by their depth (a row passes one split per level)."""
    ratio = 1.0
    for name, value in large.items():
        before = small.get(name)
        if not (isinstance(value, int | float) and isinstance(before, int | float)) or before <= 0:
            continue
        if name.endswith(("leaves", "leaf_nodes")) and before > 1:
            ratio *= max(1.0, math.log2(value) / math.log2(before))
        else:
            ratio *= max(1.0, float(value) / float(before))
    return ratio


def _candidates(
    complete: list[optuna.trial.FrozenTrial],
) -> list[tuple[dict[str, Any], optuna.trial.FrozenTrial | None, optuna.trial.FrozenTrial]]:
    """(params, trial or None when grown, the trial it comes from): the best PROMOTED trials, each
    followed by itself grown, best first."""
    out: list[tuple[dict[str, Any], optuna.trial.FrozenTrial | None, optuna.trial.FrozenTrial]] = []
    for trial in complete[:PROMOTED]:
        out.append((trial.params, trial, trial))
        bigger = grown(trial)
        if bigger is not None and all(t.params != bigger for t in complete) and all(c[0] != bigger for c in out):
            out.append((bigger, None, trial))
    return out


def promote(
    study: optuna.Study,
    data: Split,
    features: Features,
    spec: SearchSpec,
    *,
    end: float,
    final_rows: int,
    final_end: float | None = None,
) -> LastRung:
    """The last rung: the best PROMOTED trials by cross-validation score, each followed by the same
    configuration grown to its family's largest size, fit on a larger sample of the training rows
    and ranked on training rows no trial saw.

    The best is always fit (its fit is the held-out model). Another candidate is fit only when its
    fit and then the leader's final fit (``final_rows`` rows) still end by ``end``, and, unless it
    is a grown one, its own final fit too. Its cost is planned from the trials' cost per row until a
    fit here measured what a fit that runs alone costs; the final fit, at the best one's cost per
    row measured here. The winner is the best one whose final fit still ends by ``final_end``
    (``end`` when not given: a job lets a model that became the best late overrun its budget a
    little, ``runner.overrun_end``). A grown winner joins the study as a trial
    of its own (``grown_from``)."""
    fit_rows, valid_rows = promotion_rows(data, spec)
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    if not fit_rows or not complete:
        return LastRung(None, [], 0, 0)
    maximise_ = study.direction == optuna.study.StudyDirection.MAXIMIZE
    complete.sort(key=lambda t: (-float(t.value) if maximise_ else float(t.value), t.number))  # type: ignore[arg-type]
    best = complete[0]
    keep = trial_sample(data, spec)
    assert keep is not None
    rng = np.random.default_rng(spec.seed + 1)
    unseen = np.setdiff1d(np.arange(len(data.x_train)), keep)
    if spec.task is Task.classification:
        from sklearn.model_selection import train_test_split

        valid, rest = train_test_split(
            unseen, train_size=valid_rows, random_state=spec.seed, stratify=strata(data.y_train[unseen], spec.task)
        )
    else:
        shuffled = rng.permutation(unseen)
        valid, rest = shuffled[:valid_rows], shuffled[valid_rows:]
    train = np.sort(np.concatenate([keep, rng.permutation(rest)[: max(0, fit_rows - len(keep))]]))
    x, y = data.x_train.iloc[train], data.y_train[train]
    xv, yv = data.x_train.iloc[np.sort(valid)], data.y_train[np.sort(valid)]

    def final_s(p: Promoted) -> float:  # the final fit, at the cost per row measured here
        return p.fit_s / len(train) * final_rows * RUNG_FIT_MARGIN + 1.0

    ranked: list[Promoted] = []
    # Measured here / planned from the trials (a trial's fits each had one core, beside the others).
    calibration: list[float] = []

    def need(params: dict[str, Any], trial: optuna.trial.FrozenTrial | None, base: optuna.trial.FrozenTrial) -> float:
        measured = next((p for p in ranked if p.trial is not None and p.trial.number == base.number), None)
        if measured is not None:
            seconds = measured.fit_s
        else:
            seconds = fit_cost(base, len(train)) - 1.0
            if calibration:
                seconds *= max(calibration) * FINAL_FIT_MARGIN
        return seconds * (_size_ratio(base.params, params) * FINAL_FIT_MARGIN if trial is None else 1.0) + 0.5

    last = end if final_end is None else max(end, final_end)

    def leading() -> Promoted | None:
        """The best fit so far whose final fit still ends by ``last`` (the one that would win now);
        when none's does, the best. (A grown one that scored best but cannot be finalised must not
        make every other candidate look unaffordable.)"""
        order = sorted(ranked, key=lambda p: -p.score if maximise_ else p.score)
        return next((p for p in order if time.monotonic() + final_s(p) <= last), order[0]) if order else None

    pending = _candidates(complete)
    while pending:
        # The first candidate, by rank, that still fits: after each fit, from the top again, planned
        # with what that fit measured (a better one skipped on the trials' estimate may fit now).
        # Fit a candidate only if the final fit of the one leading so far still fits after it, and
        # its own would too (else it could not win). A grown configuration's own final fit is left
        # out of that plan: its cost is a guess from its size parameters until it is fit here, and
        # the guess runs high (LightGBM's 300 trees of 256 leaves cost 3.9 times its defaults on
        # 360,000 rows, where the plan says 7 times, and 3 times that on 4.4 times the rows, where
        # the plan says 4.4). It wins only if its final fit, planned from its fit here, fits too.
        leader = leading()
        planned_final = final_s(leader) if leader is not None else fit_cost(best, final_rows)
        now = time.monotonic()

        def own_final(trial: optuna.trial.FrozenTrial | None, seconds: float) -> float:
            return seconds * final_rows / len(train) if trial is not None else 0.0

        fits = [c for c in pending if now + need(*c) + max(planned_final, own_final(c[1], need(*c))) <= end]
        if not ranked:
            # The best is fit whatever the plan says: its fit here is the held-out model, which
            # otherwise a fit on the whole training split, costlier still, would have to be.
            fits = pending[:1]
        if not fits:
            break
        params, trial, base = fits[0]
        pending.remove(fits[0])
        family = FAMILIES[str(params["family"])]
        pipe = build_pipeline(features, family, family.build(optuna.trial.FixedTrial(params), spec.task, spec.seed))
        started = time.monotonic()
        with _all_cores(), _threaded(pipe):
            pipe.fit(x, y)
        fit_s = time.monotonic() - started
        if trial is not None:
            calibration.append(fit_s / max(1e-3, fit_cost(trial, len(train)) - 1.0))
        ranked.append(Promoted(params, trial, score(spec.metric, pipe, xv, yv), fit_s, pipe, base))
    if not ranked:
        return LastRung(None, [], len(train), len(valid))
    # The best whose final fit still ends by ``final_end``; when none does, no final fit follows:
    # the best fit here.
    winner = leading()
    assert winner is not None
    rung = LastRung(winner.trial, ranked, len(train), len(valid), winner.pipe, final_s(winner))
    if winner.trial is not None:
        return rung
    assert winner.base is not None
    distributions = {name: winner.base.distributions[name] for name in winner.params}
    study.add_trial(
        optuna.trial.create_trial(
            params=winner.params,
            distributions=distributions,
            value=winner.score,
            user_attrs={
                "fit_s_per_row": winner.fit_s / len(train) / alone_factor(),
                "grown_from": winner.base.number,
            },
        )
    )
    rung.winner = study.trials[-1]
    return rung


def _same_configuration(trial: optuna.Trial) -> optuna.trial.FrozenTrial | None:
    """An earlier trial of the study (finished, or running on another thread) with these very
    parameters: small discrete spaces (a random forest's) and ties at the best score make TPE
    propose a point again."""
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.RUNNING, optuna.trial.TrialState.PRUNED)
    for other in trial.study.get_trials(deepcopy=False, states=states):
        if other.number != trial.number and "duplicate_of" not in other.user_attrs and other.params == trial.params:
            return other
    return None


def fidelity_rungs(train_idx: np.ndarray, y: np.ndarray, spec: SearchSpec) -> list[np.ndarray]:
    """The rows of fold 0's training set each rung fits on (growing, each within the next), or none when
    the smallest rung would be under MIN_RUNG_ROWS: small data is cheap to fit whole."""
    if len(train_idx) * RUNG_FRACTIONS[0] < MIN_RUNG_ROWS:
        return []
    order = np.random.default_rng(spec.seed).permutation(train_idx)
    if spec.task is Task.classification:
        # Every class in every rung, in proportion: sort the shuffled rows by class rank within class.
        labels = y[order]
        rank = np.empty(len(order))
        for label in np.unique(labels):
            where = np.flatnonzero(labels == label)
            rank[where] = np.arange(len(where)) / len(where)
        order = order[np.argsort(rank, kind="stable")]
    return [np.sort(order[: int(len(order) * fraction)]) for fraction in RUNG_FRACTIONS]


class FidelityPruner(optuna.pruners.BasePruner):
    """Successive halving on the data-size rungs (ASHA's rule: continue while in the top 1/REDUCTION
    of the trials that reached the rung), the median rule over the folds after.

    The first ``protected`` trials (each family's defaults) are never cut at a rung: a family is not
    ruled out on a ninth of the data before anything else has been seen."""

    def __init__(self, protected: int) -> None:
        self.protected = protected
        self.median = optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=FULL_STEP)

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        if step >= FULL_STEP:
            return bool(self.median.prune(study, trial))
        if trial.number < self.protected:
            return False
        value = trial.intermediate_values[step]
        others = [
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False)
            if t.number != trial.number
            and step in t.intermediate_values
            and not math.isnan(t.intermediate_values[step])
        ]
        if len(others) < MIN_COMPETITORS or math.isnan(value):
            return len(others) >= MIN_COMPETITORS  # a rung that scored nothing is cut
        maximize = study.direction == optuna.study.StudyDirection.MAXIMIZE
        ranked = sorted([*others, value], reverse=maximize)
        cutoff = ranked[max(1, len(ranked) // REDUCTION) - 1]
        return value < cutoff if maximize else value > cutoff


def make_storage(url: str) -> optuna.storages.RDBStorage:
    """Optuna's RDB storage on the metadata DB; the heartbeat fails trials of a worker that died."""
    kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if url.startswith("sqlite"):
        kwargs["connect_args"] = {"timeout": 60}  # writers queue instead of "database is locked"
    for attempt in range(5):
        try:
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=10, grace_period=60)
        except sqlalchemy.exc.DBAPIError:
            # Two shards starting at once both create Optuna's tables; PostgreSQL refuses the
            # second CREATE TABLE. The next attempt finds the tables made and goes on.
            if attempt == 4:
                raise
            time.sleep(0.5 + random.random())  # noqa: S311
    raise AssertionError("unreachable")


def new_study(
    storage: optuna.storages.BaseStorage, name: str, spec: SearchSpec, *, grown: bool = False
) -> optuna.Study:
    """The job's study. ``grown``: trials fit on a sample of more rows, so after each family's
    defaults the boosters' defaults grown to their largest size are tried too (more rows favour
    larger models; the last rung then ranks them on more rows)."""
    return optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize" if maximise(spec.metric) else "minimize",
        # One sampler for all of this process's trial threads (see run_search); constant_liar makes
        # TPE count running trials as bad, so trials running side by side do not pick the same point.
        sampler=DefaultsFirst(
            optuna.samplers.TPESampler(
                seed=(spec.seed + 1_000_003 * spec.shard) % 2**32,
                n_startup_trials=max(5, len(spec.families)),
                constant_liar=True,
            ),
            spec.families,
            grown=grown,
        ),
        pruner=FidelityPruner(protected=len(spec.families)),
        load_if_exists=True,
    )


class DefaultsFirst(optuna.samplers.BaseSampler):
    """Trials 0..k-1 of a study are each family's learner defaults, cheapest family first (FLAML's
    cost-frugal start: a good model early, and what the sampler then improves on); later trials
    are ``base``'s. Keyed on the trial number the storage hands out, so the threads and shards of
    one job share the list and none runs a default twice (Optuna's queue of enqueued trials can
    hand one to two threads at once)."""

    def __init__(self, base: optuna.samplers.BaseSampler, families: list[str], *, grown: bool = False) -> None:
        self.base = base
        self.defaults = [{"family": name, **dict(FAMILIES[name].defaults)} for name in by_cost(families)]
        if grown:  # then the same grown, where a family has sizes to grow (cheapest family first)
            self.defaults += [
                {**d, **dict(FAMILIES[str(d["family"])].largest)}
                for d in self.defaults
                if FAMILIES[str(d["family"])].largest
            ]

    def _default(self, trial: optuna.trial.FrozenTrial) -> dict[str, Any] | None:
        return self.defaults[trial.number] if trial.number < len(self.defaults) else None

    def infer_relative_search_space(
        self, study: optuna.Study, trial: optuna.trial.FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        if self._default(trial) is not None:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        if self._default(trial) is not None:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        default = self._default(trial)
        if (
            default is not None
            and param_name in default
            and param_distribution._contains(param_distribution.to_internal_repr(default[param_name]))
        ):
            return default[param_name]
        return self.base.sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        self.base.before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: optuna.trial.FrozenTrial,
        state: optuna.trial.TrialState,
        values: Any,
    ) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()


def _result(trial: optuna.trial.FrozenTrial) -> TrialResult:
    params = {k: v for k, v in trial.params.items() if k != "family"}
    duration = trial.duration.total_seconds() if trial.duration else 0.0
    value = trial.value if trial.state == optuna.trial.TrialState.COMPLETE else None
    return TrialResult(
        number=trial.number,
        family=str(trial.params.get("family", "")),
        params=params,
        score=value,
        duration_s=duration,
        state=trial.state.name.lower(),
        worker=str(trial.user_attrs.get("worker", "")),
        error=trial.user_attrs.get("error"),
    )


def run_search(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    data: Split,
    features: Features,
    spec: SearchSpec,
    control: SearchControl,
) -> None:
    """Run trials on ``spec.n_jobs`` threads until the budget, the time limit or a stop request ends it.

    ``spec.timeout_s`` is a hard limit, less what is kept for the final fits (the best trial's,
    planned from its cost per row; LAST_RUNG_SHARE of the budget at least when trials fit on a
    sample): no trial starts after it, and trials still fitting then are stopped (reported failed,
    "over the time budget"). A fit cannot be interrupted, so its thread is left to run at the lowest CPU
    priority until the process ends, while the final fits take the cores.
    """
    started = time.monotonic()
    on_sample = sampled(data, spec)
    floor = LAST_RUNG_SHARE * spec.timeout_s if on_sample and spec.timeout_s else 0.0
    reserve = [floor]  # the final fits of the best trial so far; the last rung's share at least

    def deadline() -> float:
        return started + spec.timeout_s - reserve[0] if spec.timeout_s else math.inf

    over = threading.Event()
    objective = make_objective(data, features, spec, control, over, deadline if spec.timeout_s else None)
    failures: list[BaseException] = []
    running: dict[int, int] = {}  # thread's native id -> number of the trial it runs
    # One study, so one sampler and one random stream, shared by every trial thread: each trial
    # draws the next configuration. (A study per thread, seeded alike, drew the same ones.)
    study = new_study(storage, study_name, spec, grown=on_sample)

    def tracked(trial: optuna.Trial) -> float:
        running[threading.get_native_id()] = trial.number
        try:
            return objective(trial)
        finally:
            running.pop(threading.get_native_id(), None)

    def loop() -> None:
        repeats = [0]  # trials in a row that drew a configuration tried before

        def record(_study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
            if over.is_set():
                return
            if "duplicate_of" in trial.user_attrs:  # not a trial of the job: drawn again, on the same claim
                repeats[0] += 1
                return
            repeats[0] = 0
            control.on_trial(_result(trial))
            if spec.final_fit_rows and trial.state == optuna.trial.TrialState.COMPLETE:
                with suppress(ValueError):
                    reserve[0] = max(floor, fit_cost(study.best_trial, spec.final_fit_rows))

        while not control.should_stop() and time.monotonic() < deadline() and not over.is_set():
            if repeats[0] > MAX_REPEATS:
                return  # the sampler keeps proposing what was tried: the space is spent
            if repeats[0] == 0 and not control.claim():
                return
            try:
                study.optimize(
                    _guard(tracked), n_trials=1, callbacks=[record], catch=(Exception,), gc_after_trial=False
                )
            except (Cancelled, OverBudget):
                return
            except BaseException as exc:
                if not over.is_set():
                    failures.append(exc)
                return

    threads = [threading.Thread(target=loop, name=f"trials-{i}", daemon=True) for i in range(max(1, spec.n_jobs))]
    for t in threads:
        t.start()
    for t in threads:
        while t.is_alive() and time.monotonic() < deadline():
            t.join(timeout=min(1.0, max(0.01, deadline() - time.monotonic())))
    if any(t.is_alive() for t in threads):
        over.set()
        _stop_overrunning(storage, study_name, study, running, control)
    if failures:
        raise failures[0]


def _stop_overrunning(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    study: optuna.Study,
    running: dict[int, int],
    control: SearchControl,
) -> None:
    """End the trials still fitting at the deadline: failed, over the budget; their threads yield the CPU."""
    import os

    for native_id, number in list(running.items()):
        with suppress(OSError):  # the thread ended meanwhile
            os.setpriority(os.PRIO_PROCESS, native_id, 19)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
        try:
            storage.set_trial_user_attr(trial_id, "error", OVER_BUDGET)
            storage.set_trial_state_values(trial_id, optuna.trial.TrialState.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it finished right at the deadline
        control.on_trial(_result(storage.get_trial(trial_id)))


def end_running_trials(
    storage: optuna.storages.BaseStorage,
    study_name: str,
    *,
    worker: str,
    state: optuna.trial.TrialState,
    reason: str,
    unclaimed: bool = False,
) -> list[TrialResult]:
    """End the trials of ``worker`` that a killed search process left RUNNING, saying why on each.

    ``unclaimed`` also ends running trials no worker has put its name on yet (a trial is created
    an instant before its objective names it): right when the whole job stops, wrong while
    another shard may still be starting one.
    """
    try:
        study_id = storage.get_study_id_from_name(study_name)
    except KeyError:
        return []  # stopped before the search made its study
    ended = []
    for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        owner = trial.user_attrs.get("worker")
        if owner != worker and not (unclaimed and owner is None):
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        try:
            storage.set_trial_user_attr(trial_id, "error", reason)
            storage.set_trial_state_values(trial_id, state)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # it ended meanwhile, on its own or by another shard's hand
        ended.append(_result(storage.get_trial(trial_id)))
    return ended


def _guard(objective: Callable[[optuna.Trial], float]) -> Callable[[optuna.Trial], float]:
    """Keep a failed trial's reason on the trial, and turn a cancel into a pruned trial."""

    def run(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except Cancelled:
            trial.set_user_attr("error", "cancelled")
            raise optuna.TrialPruned from None
        except (optuna.TrialPruned, OverBudget):
            raise
        except Exception as exc:
            trial.set_user_attr("error", public_reason(exc, limit=400))
            raise

    return run


def affordable_best(study: optuna.Study, rows: int, seconds: float) -> tuple[optuna.trial.FrozenTrial | None, bool]:
    """The best completed trial whose fits on ``rows`` rows fit in ``seconds``; else the cheapest
    one. The flag says whether it is the study's best."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None, False
    best = study.best_trial
    affordable = [t for t in complete if fit_cost(t, rows) <= seconds]
    if not affordable:
        return min(complete, key=lambda t: fit_cost(t, rows)), False
    sign = -1 if study.direction == optuna.study.StudyDirection.MAXIMIZE else 1
    chosen = min(affordable, key=lambda t: (sign * float(t.value or 0.0), t.number))
    return chosen, chosen.number == best.number


def best_trial(study: optuna.Study) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        return None
    return study.best_trial


def refit(
    trial: optuna.trial.FrozenTrial,
    data: Split,
    features: Features,
    spec: SearchSpec,
    *,
    every_row: bool = False,
    rows: int | None = None,
) -> tuple[Pipeline, Family]:
    """Rebuild the best configuration and fit it on the whole training split, or with ``every_row``
    on the training and test rows together (the model that is served: the test score is measured
    before, on the split's model); ``rows``: on a sample of that many of them (stratified), when
    the time left does not allow them all."""
    family = FAMILIES[str(trial.params["family"])]
    fixed = optuna.trial.FixedTrial(trial.params)
    pipe = build_pipeline(features, family, family.build(fixed, spec.task, spec.seed))
    with _all_cores(), _threaded(pipe):
        _fit_all(pipe, data, every_row=every_row, rows=rows, spec=spec)
    return pipe, family


@contextmanager
def _threaded(pipe: Pipeline) -> Iterator[None]:
    """A fit that runs alone uses every core: the families' ``n_jobs=1`` (one thread per parallel
    trial) is raised to the refit's threads while it fits (the boosters, the random forest), and
    set back after, so the served model predicts on one thread as before."""
    cores = refit_threads()
    model = pipe.steps[-1][0]  # the estimator's threads only: the preprocessing's n_jobs would start processes
    before = {
        name: value
        for name, value in pipe.get_params(deep=True).items()
        if name.startswith(f"{model}__") and name.endswith("n_jobs")
    }

    def fitted_copies(threads: int) -> None:  # a wrapper's fitted copy (LabelEncodedClassifier's)
        for step in pipe.named_steps.values():
            inner = getattr(step, "estimator_", None)
            if inner is not None and "n_jobs" in inner.get_params(deep=False):
                inner.set_params(n_jobs=threads)

    if cores > 1 and before:
        pipe.set_params(**dict.fromkeys(before, cores))
        fitted_copies(cores)  # a fitted model predicting alone
    try:
        yield
    finally:
        if cores > 1 and before:
            pipe.set_params(**before)
            fitted_copies(1)


@contextmanager
def _all_cores() -> Iterator[None]:
    """The refit runs alone: lift the per-trial thread limit (``trainer.thread_budget``) for it."""
    from threadpoolctl import threadpool_limits

    cores = refit_threads()
    if cores <= 1:
        yield
        return
    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    with threadpool_limits(limits=cores):
        if torch is not None:
            torch.set_num_threads(cores)
        try:
            yield
        finally:
            if torch is not None and before is not None:
                torch.set_num_threads(before)


def _fit_all(pipe: Pipeline, data: Split, *, every_row: bool, rows: int | None, spec: SearchSpec) -> None:
    import pandas as pd

    x, y = (
        (pd.concat([data.x_train, data.x_test]), np.concatenate([data.y_train, data.y_test]))
        if every_row
        else (
            data.x_train,
            data.y_train,
        )
    )
    if rows is not None and rows < len(x):
        from sklearn.model_selection import train_test_split

        try:
            keep, _ = train_test_split(
                np.arange(len(x)), train_size=rows, random_state=spec.seed, stratify=strata(y, spec.task)
            )
        except ValueError:  # a class too rare to stratify on
            keep, _ = train_test_split(np.arange(len(x)), train_size=rows, random_state=spec.seed)
        keep = np.sort(keep)
        x, y = x.iloc[keep], y[keep]
    pipe.fit(x, y)


def holdout_metrics(pipe: Pipeline, data: Split, task: Task) -> dict[str, float]:
    return holdout(pipe, data, task)[0]


def holdout(pipe: Pipeline, data: Split, task: Task) -> tuple[dict[str, float], np.ndarray]:
    """The held-out metrics of ``pipe`` and its predictions of the held-out rows, predicted on
    every core (the model predicts alone here; served, it keeps one thread)."""
    metrics = CLASSIFICATION_METRICS if task is Task.classification else REGRESSION_METRICS
    with _all_cores(), _threaded(pipe):
        try:
            out, pred = _scores(metrics, pipe, data.x_test, data.y_test)
            if pred is not None:
                return out, pred
        except (ValueError, AttributeError):  # e.g. roc_auc with one class in the test split
            pass
        found = {}
        for m in metrics:
            try:
                found[m] = score(m, pipe, data.x_test, data.y_test)
            except (ValueError, AttributeError):
                continue
        return found, np.asarray(pipe.predict(data.x_test))
