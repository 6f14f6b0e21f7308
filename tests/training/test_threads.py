"""A job's libraries run no more threads than cores: each parallel trial gets its share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from miniml.orchestration.trainer import thread_budget

# Two trial threads, each fitting HistGradientBoosting (OpenMP) and reading what its libraries
# would use; then the refit's view, alone, through search._all_cores.
PROBE = """
import json, threading
import numpy as np
from sklearn.ensemble import HistGradientBoostingRegressor
from threadpoolctl import threadpool_info
import torch
from miniml.training.search import _all_cores

seen = []
def trial():
    x = np.random.default_rng(0).normal(size=(2000, 8))
    HistGradientBoostingRegressor(max_iter=5).fit(x, x[:, 0])
    pools = {p["user_api"]: p["num_threads"] for p in threadpool_info()}
    seen.append({"openmp": pools.get("openmp", 1), "blas": pools.get("blas", 1), "torch": torch.get_num_threads()})
threads = [threading.Thread(target=trial) for _ in range(2)]
[t.start() for t in threads]; [t.join() for t in threads]
with _all_cores():
    pools = {p["user_api"]: p["num_threads"] for p in threadpool_info()}
    refit = {"openmp": pools.get("openmp", 1), "torch": torch.get_num_threads()}
print(json.dumps({"trials": seen, "refit": refit}))
"""

LIMITS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS", "NUMEXPR_NUM_THREADS")


def _probe(env: dict[str, str]) -> dict[str, object]:
    base = {k: v for k, v in os.environ.items() if k not in (*LIMITS, "MINIML_REFIT_THREADS")}
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=base | env, capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_two_trials_share_the_cores_and_the_refit_takes_them_all() -> None:
    cores = 4  # as if on four cores, whatever this machine has: the budget is what is checked
    seen = _probe(thread_budget(2, cores=cores))
    for trial in seen["trials"]:  # type: ignore[union-attr]
        assert max(trial.values()) == 2, seen  # type: ignore[union-attr]
    assert sum(t["openmp"] for t in seen["trials"]) <= cores  # type: ignore[index,union-attr]
    assert seen["refit"] == {"openmp": cores, "torch": cores}


def test_without_the_budget_the_trials_would_oversubscribe() -> None:
    """The failing case the budget prevents: every trial's libraries take every core."""
    cores = os.cpu_count() or 1
    seen = _probe({})
    assert sum(t["openmp"] for t in seen["trials"]) == 2 * cores  # type: ignore[index,union-attr]


def test_cores_follow_the_cgroup_quota_not_the_nodes_count(tmp_path: Path) -> None:
    """A pod limited to 1.5 CPUs on a big node gets 2 trial threads' worth, not the node's count."""
    from miniml.cores import available_cores

    mine = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert available_cores(v2) == min(mine, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert available_cores(v2) == mine
    v1 = tmp_path / "v1" / "cpu"
    v1.mkdir(parents=True)
    (v1 / "cpu.cfs_quota_us").write_text("50000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert available_cores(v1.parent) == 1
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert available_cores(v1.parent) == mine
    assert available_cores(tmp_path / "none") == mine
    (v2 / "cpu.max").write_text("garbage\n")
    assert available_cores(v2) == mine
    assert thread_budget(0, cores=available_cores(tmp_path / "none"))["MINIML_REFIT_THREADS"] == str(mine)


def test_a_fit_that_runs_alone_uses_every_core_and_the_model_serves_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trials fit the boosters on one thread each (many run at once); the final fit, alone, on the
    refit's threads; the served model predicts on one thread again."""
    import numpy as np
    import optuna
    import pandas as pd

    from miniml.domain.tasks import Task
    from miniml.training.data import Features
    from miniml.training.families import FAMILIES
    from miniml.training.search import _threaded, build_pipeline

    monkeypatch.setenv("MINIML_REFIT_THREADS", "4")
    x = pd.DataFrame(np.random.default_rng(0).normal(size=(300, 3)), columns=["a", "b", "c"])
    y = np.where(x["a"] > 0, "yes", "no")
    for name in ("xgboost", "lightgbm", "random_forest"):
        family = FAMILIES[name]
        estimator = family.build(optuna.trial.FixedTrial(dict(family.defaults)), Task.classification, 0)
        pipe = build_pipeline(Features(numeric=["a", "b", "c"], categorical=[]), family, estimator)

        def threads() -> set[int]:
            model = pipe.steps[-1][0]
            return {v for k, v in pipe.get_params(deep=True).items() if k.startswith(model) and k.endswith("n_jobs")}

        assert threads() == {1}
        with _threaded(pipe):
            assert threads() == {4}, name
            pipe.fit(x, y)
        assert threads() == {1}, name
        fitted = getattr(pipe[-1], "estimator_", None)  # LabelEncodedClassifier's fitted booster
        assert fitted is None or fitted.get_params().get("n_jobs", 1) == 1, name
        assert (pipe.predict(x) == y).mean() > 0.9
        assert all(v is None for k, v in pipe.get_params().items() if k.endswith("n_jobs") and k.startswith("prep"))
