"""Figures a person wants next to a run: search history, parameter importances, errors, features."""

from __future__ import annotations

from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: workers have no display

import matplotlib.pyplot as plt
import numpy as np
import optuna
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import ConfusionMatrixDisplay


def optimisation_history(study: optuna.Study, maximise: bool) -> Figure:
    trials = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE and t.value is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    if trials:
        xs = [t.number for t in trials]
        ys = [float(t.value) for t in trials if t.value is not None]
        best = np.maximum.accumulate(ys) if maximise else np.minimum.accumulate(ys)
        ax.scatter(xs, ys, s=14, label="trial")
        ax.plot(xs, best, color="C1", label="best so far")
        ax.legend()
    ax.set_xlabel("trial")
    ax.set_ylabel("CV score")
    ax.set_title("Optimisation history")
    fig.tight_layout()
    return fig


def parameter_importances(study: optuna.Study) -> Figure | None:
    try:
        importances = optuna.importance.get_param_importances(study)
    except (RuntimeError, ValueError, ZeroDivisionError):
        return None  # too few complete trials, or a single distribution
    if not importances:
        return None
    names = list(importances)[:15][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    ax.barh(names, [importances[n] for n in names])
    ax.set_title("Parameter importances (fANOVA)")
    fig.tight_layout()
    return fig


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 5))
    # Integer codes in the labels' sorted order: the same matrix, without sorting every row's text.
    seen = list(dict.fromkeys([*pd.unique(y_true), *pd.unique(y_pred)]))
    try:
        labels = sorted(seen)
    except TypeError:  # labels of mixed types
        labels = sorted(seen, key=str)
    index = {label: i for i, label in enumerate(labels)}

    def codes(values: np.ndarray) -> np.ndarray:
        found, uniques = pd.factorize(values)
        mapped: np.ndarray = np.array([index[u] for u in uniques], dtype=int)[found]
        return mapped

    ConfusionMatrixDisplay.from_predictions(
        codes(y_true),
        codes(y_pred),
        labels=list(range(len(labels))),
        display_labels=[str(label) for label in labels],
        ax=ax,
        xticks_rotation=45,
        colorbar=False,
    )
    ax.set_title("Confusion matrix (held-out split)")
    fig.tight_layout()
    return fig


def residuals(y_true: np.ndarray, y_pred: np.ndarray) -> Figure:
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(y_pred, y_true - y_pred, s=10)
    ax.axhline(0, color="C1")
    ax.set_xlabel("predicted")
    ax.set_ylabel("actual - predicted")
    ax.set_title("Residuals (held-out split)")
    fig.tight_layout()
    return fig


def feature_importances(pipeline: Any) -> Figure | None:
    model = pipeline.named_steps["model"]
    values = getattr(model, "feature_importances_", None)
    if values is None and hasattr(model, "coef_"):
        values = np.abs(np.asarray(model.coef_)).reshape(-1, len(pipeline[:-1].get_feature_names_out())).mean(axis=0)
    if values is None:
        return None
    try:
        names = list(pipeline[:-1].get_feature_names_out())
    except (AttributeError, ValueError):
        names = [f"f{i}" for i in range(len(values))]
    order = np.argsort(values)[::-1][:20][::-1]
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(order) + 1.5))
    ax.barh([names[i] for i in order], [float(values[i]) for i in order])
    ax.set_title("Feature importances")
    fig.tight_layout()
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
