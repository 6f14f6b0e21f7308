"""Upper bounds on what a request may ask for, checked by validation before the DB or MLflow see it."""

from __future__ import annotations

# Ids and versions fit a 32-bit signed integer (PostgreSQL's INTEGER, MLflow's version column).
MAX_ID = 2**31 - 1
MAX_TRIALS = 10_000
MAX_SEED = 2**32 - 1  # numpy's and Optuna's seeds are 32-bit
