"""The PyTorch family trains where the process sees a GPU and serves from the CPU either way."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification

from miniml.training.estimators import TorchMLPClassifier


def _fit() -> tuple[TorchMLPClassifier, np.ndarray, np.ndarray]:
    x, y = make_classification(n_samples=600, n_features=8, n_informative=5, random_state=0)
    model = TorchMLPClassifier(task="classification", hidden=32, layers=2, epochs=15, batch_size=64, seed=0)
    return model.fit(x.astype(np.float32), y), x, y


def test_the_mlp_trains_on_cuda_when_present_and_is_kept_on_the_cpu() -> None:
    model, x, y = _fit()
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.device_.startswith(expected)
    assert all(p.device.type == "cpu" for p in model.model_.parameters())  # served from the CPU
    assert (model.predict(x) == y).mean() > 0.8
    again = pickle.loads(pickle.dumps(model))
    assert np.array_equal(again.predict(x), model.predict(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_cuda_trained_mlp_round_trips_and_predicts_from_the_cpu() -> None:
    model, x, _ = _fit()
    state = pickle.dumps(model)
    cpu_only = pickle.loads(state)
    assert cpu_only.device_.startswith("cuda")
    assert np.allclose(cpu_only.predict_proba(x), model.predict_proba(x), atol=1e-5)
