"""Model families and their Optuna search spaces.

Each family builds an estimator from a trial; the family itself is the search's first choice.
Parameter names carry the family's prefix so every family keeps its own dimensions in TPE.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from miniml.domain.tasks import Task

Builder = Callable[[optuna.Trial | optuna.trial.FixedTrial, Task, int], Any]


@dataclass(frozen=True)
class Family:
    name: str
    build: Builder
    scale_numeric: bool
    # MLflow serialisation: skops with an explicit allowlist of the types each family's pipeline
    # holds (scikit-learn's, the boosters', our own estimators'). No family uses pickle; the
    # platform also signs the artifacts and loads nothing unsigned.
    serialization: str
    trusted_types: tuple[str, ...] = ()
    pip: tuple[str, ...] = ()
    # The learner's own defaults in this family's search space: a job tries them first, the
    # cheapest family first (``by_cost``), before the sampler explores.
    defaults: tuple[tuple[str, Any], ...] = ()
    # Its size parameters at their largest in the space: when trials fit on a sample, the last rung
    # also tries the best configuration of this family grown to them (more rows favour larger models).
    largest: tuple[tuple[str, Any], ...] = ()


def _linear(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
    from sklearn.linear_model import LogisticRegression, Ridge

    if task is Task.classification:
        return LogisticRegression(C=trial.suggest_float("linear.C", 1e-3, 1e2, log=True), max_iter=2000)
    return Ridge(alpha=trial.suggest_float("linear.alpha", 1e-3, 1e2, log=True), random_state=seed)


def _forest(name: str, classifier: str, regressor: str) -> Builder:
    """A scikit-learn forest's builder (random forest, extra trees: the same parameters), its
    parameters prefixed with ``name``."""

    def build(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
        import sklearn.ensemble

        cls = getattr(sklearn.ensemble, classifier if task is Task.classification else regressor)
        return cls(
            n_estimators=trial.suggest_int(f"{name}.n_estimators", 50, 300, step=50),
            max_depth=trial.suggest_int(f"{name}.max_depth", 2, 20),
            min_samples_leaf=trial.suggest_int(f"{name}.min_samples_leaf", 1, 10),
            max_features=trial.suggest_categorical(f"{name}.max_features", ["sqrt", 0.5, 1.0]),
            n_jobs=1,
            random_state=seed,
        )

    return build


def _forest_family(name: str, classifier: str, regressor: str) -> Family:
    """Its family: defaults 100 trees of depth up to 20, grown to 300 trees."""
    return Family(
        name,
        _forest(name, classifier, regressor),
        scale_numeric=False,
        serialization="skops",
        trusted_types=(*_SKLEARN_TRUSTED, "sklearn.tree._tree.Tree"),
        defaults=(
            (f"{name}.n_estimators", 100),
            (f"{name}.max_depth", 20),
            (f"{name}.min_samples_leaf", 1),
            (f"{name}.max_features", "sqrt"),
        ),
        largest=((f"{name}.n_estimators", 300),),
    )


def _hist_gradient_boosting(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor

    cls = HistGradientBoostingClassifier if task is Task.classification else HistGradientBoostingRegressor
    return cls(
        learning_rate=trial.suggest_float("hist_gradient_boosting.learning_rate", 0.01, 0.3, log=True),
        max_iter=trial.suggest_int("hist_gradient_boosting.max_iter", 50, 300, step=50),
        max_leaf_nodes=trial.suggest_int("hist_gradient_boosting.max_leaf_nodes", 8, 64, log=True),
        l2_regularization=trial.suggest_float("hist_gradient_boosting.l2_regularization", 1e-6, 1.0, log=True),
        random_state=seed,
    )


def _lightgbm(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
    import lightgbm as lgb

    cls = lgb.LGBMClassifier if task is Task.classification else lgb.LGBMRegressor
    return cls(
        n_estimators=trial.suggest_int("lightgbm.n_estimators", 50, 300, step=50),
        learning_rate=trial.suggest_float("lightgbm.learning_rate", 0.01, 0.3, log=True),
        num_leaves=trial.suggest_int("lightgbm.num_leaves", 8, 256, log=True),
        min_child_samples=trial.suggest_int("lightgbm.min_child_samples", 2, 30),
        subsample=trial.suggest_float("lightgbm.subsample", 0.6, 1.0),
        subsample_freq=1,
        colsample_bytree=trial.suggest_float("lightgbm.colsample_bytree", 0.6, 1.0),
        n_jobs=1,
        verbose=-1,
        random_state=seed,
    )


def _xgboost(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
    import xgboost as xgb

    from miniml.training.estimators import LabelEncodedClassifier

    params: dict[str, Any] = {
        "n_estimators": trial.suggest_int("xgboost.n_estimators", 50, 300, step=50),
        "max_depth": trial.suggest_int("xgboost.max_depth", 2, 8),
        "learning_rate": trial.suggest_float("xgboost.learning_rate", 0.01, 0.3, log=True),
        "subsample": trial.suggest_float("xgboost.subsample", 0.6, 1.0),
        "colsample_bytree": trial.suggest_float("xgboost.colsample_bytree", 0.6, 1.0),
        "tree_method": "hist",
        "n_jobs": 1,
        "random_state": seed,
    }
    if task is Task.classification:
        return LabelEncodedClassifier(xgb.XGBClassifier(**params))
    return xgb.XGBRegressor(**params)


def _torch_mlp(trial: optuna.Trial | optuna.trial.FixedTrial, task: Task, seed: int) -> Any:
    from miniml.training.estimators import LabelEncodedClassifier, TorchMLPClassifier, TorchMLPRegressor

    params: dict[str, Any] = {
        "hidden": trial.suggest_int("torch_mlp.hidden", 16, 128, log=True),
        "layers": trial.suggest_int("torch_mlp.layers", 1, 3),
        "dropout": trial.suggest_float("torch_mlp.dropout", 0.0, 0.3),
        "lr": trial.suggest_float("torch_mlp.lr", 1e-4, 3e-2, log=True),
        "weight_decay": trial.suggest_float("torch_mlp.weight_decay", 1e-6, 1e-2, log=True),
        "epochs": trial.suggest_int("torch_mlp.epochs", 20, 120, step=20),
        "batch_size": trial.suggest_categorical("torch_mlp.batch_size", [32, 64, 128]),
        "seed": seed,
    }
    if task is Task.classification:
        return LabelEncodedClassifier(TorchMLPClassifier(task="classification", **params))
    return TorchMLPRegressor(task="regression", **params)


_SKLEARN_TRUSTED = ("numpy.dtype",)

# Add new model families here, in the order of their cost on the same data (cheapest first).
FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            "linear",
            _linear,
            scale_numeric=True,
            serialization="skops",
            trusted_types=_SKLEARN_TRUSTED,
            defaults=(("linear.C", 1.0), ("linear.alpha", 1.0)),
        ),
        Family(
            "lightgbm",
            _lightgbm,
            scale_numeric=False,
            serialization="skops",
            # The booster travels as LightGBM's own model text inside its state.
            trusted_types=(
                *_SKLEARN_TRUSTED,
                "collections.OrderedDict",
                "lightgbm.basic.Booster",
                "lightgbm.sklearn.LGBMClassifier",
                "lightgbm.sklearn.LGBMRegressor",
            ),
            pip=("lightgbm",),
            defaults=(
                ("lightgbm.n_estimators", 100),
                ("lightgbm.learning_rate", 0.1),
                ("lightgbm.num_leaves", 31),
                ("lightgbm.min_child_samples", 20),
                ("lightgbm.subsample", 1.0),
                ("lightgbm.colsample_bytree", 1.0),
            ),
            largest=(("lightgbm.n_estimators", 300), ("lightgbm.num_leaves", 256)),
        ),
        Family(
            "hist_gradient_boosting",
            _hist_gradient_boosting,
            scale_numeric=False,
            serialization="skops",
            trusted_types=(*_SKLEARN_TRUSTED, "sklearn.ensemble._hist_gradient_boosting.predictor.TreePredictor"),
            defaults=(
                ("hist_gradient_boosting.learning_rate", 0.1),
                ("hist_gradient_boosting.max_iter", 100),
                ("hist_gradient_boosting.max_leaf_nodes", 31),
                ("hist_gradient_boosting.l2_regularization", 1e-6),
            ),
            largest=(("hist_gradient_boosting.max_iter", 300), ("hist_gradient_boosting.max_leaf_nodes", 64)),
        ),
        Family(
            "xgboost",
            _xgboost,
            scale_numeric=False,
            serialization="skops",
            trusted_types=(
                *_SKLEARN_TRUSTED,
                "miniml.training.estimators.LabelEncodedClassifier",
                "xgboost.core.Booster",
                "xgboost.sklearn.XGBClassifier",
                "xgboost.sklearn.XGBRegressor",
            ),
            pip=("xgboost-cpu",),
            defaults=(
                ("xgboost.n_estimators", 100),
                ("xgboost.max_depth", 6),
                ("xgboost.learning_rate", 0.3),
                ("xgboost.subsample", 1.0),
                ("xgboost.colsample_bytree", 1.0),
            ),
            largest=(("xgboost.n_estimators", 300), ("xgboost.max_depth", 8)),
        ),
        # Random splits instead of the best ones: cheaper than a random forest, and often as good or
        # better on many similar numeric columns (pixels, sensors).
        _forest_family("extra_trees", "ExtraTreesClassifier", "ExtraTreesRegressor"),
        _forest_family("random_forest", "RandomForestClassifier", "RandomForestRegressor"),
        Family(
            "torch_mlp",
            _torch_mlp,
            scale_numeric=True,
            serialization="skops",
            # The network travels as a state_dict read back with torch.load(weights_only=True).
            trusted_types=(
                *_SKLEARN_TRUSTED,
                "miniml.training.estimators.LabelEncodedClassifier",
                "miniml.training.estimators.TorchMLPClassifier",
                "miniml.training.estimators.TorchMLPRegressor",
            ),
            pip=("torch",),
            defaults=(
                ("torch_mlp.hidden", 64),
                ("torch_mlp.layers", 2),
                ("torch_mlp.dropout", 0.1),
                ("torch_mlp.lr", 1e-3),
                ("torch_mlp.weight_decay", 1e-4),
                ("torch_mlp.epochs", 40),
                ("torch_mlp.batch_size", 64),
            ),
        ),
    )
}


def by_cost(names: list[str]) -> list[str]:
    """``names`` cheapest first (the order of FAMILIES)."""
    order = list(FAMILIES)
    return sorted(names, key=order.index)
