"""Estimators miniml adds to scikit-learn's: label decoding, and a PyTorch MLP with the sklearn API."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.preprocessing import LabelEncoder

# What the fits on this thread ask between steps: should they stop? (See ``stoppable``.)
_stop = threading.local()
# The MLP asks every this many mini-batches, and at each epoch's end.
STOP_CHECK_STEPS = 50


class FitStopped(Exception):
    """A fit ended early because its caller asked it to (``stoppable``)."""


@contextmanager
def stoppable(should_stop: Callable[[], bool]) -> Iterator[None]:
    """Fits on this thread inside the block end early, raising FitStopped, once ``should_stop()``
    says so (the MLP checks between mini-batches). A search past its deadline or cancelled must not
    leave a long fit running: the thread would hold the GIL the last rung and the final fit need."""
    before = getattr(_stop, "check", None)
    _stop.check = should_stop
    try:
        yield
    finally:
        _stop.check = before


def _stop_requested() -> bool:
    check = getattr(_stop, "check", None)
    return bool(check is not None and check())


class LabelEncodedClassifier(ClassifierMixin, BaseEstimator):  # type: ignore[misc]
    """Fits ``estimator`` on integer-coded labels and predicts the original labels (XGBoost, the MLP)."""

    def __init__(self, estimator: Any = None) -> None:
        self.estimator = estimator

    def fit(self, x: Any, y: Any, **kwargs: Any) -> LabelEncodedClassifier:
        self.encoder_ = LabelEncoder().fit(y)
        self.classes_ = self.encoder_.classes_
        self.estimator_ = clone(self.estimator).fit(x, self.encoder_.transform(y), **kwargs)
        return self

    def predict(self, x: Any) -> np.ndarray:
        return self.encoder_.inverse_transform(np.asarray(self.estimator_.predict(x)).astype(int).ravel())  # type: ignore[no-any-return]

    def predict_proba(self, x: Any) -> np.ndarray:
        return np.asarray(self.estimator_.predict_proba(x))

    @property
    def feature_importances_(self) -> np.ndarray:
        return np.asarray(self.estimator_.feature_importances_)


class TorchMLP(BaseEstimator):  # type: ignore[misc]
    """A multilayer perceptron in PyTorch; CPU by default, CUDA when present."""

    def __init__(
        self,
        *,
        task: str = "classification",
        hidden: int = 64,
        layers: int = 2,
        dropout: float = 0.1,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        epochs: int = 50,
        batch_size: int = 64,
        seed: int = 0,
    ) -> None:
        self.task = task
        self.hidden = hidden
        self.layers = layers
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.epochs = epochs
        self.batch_size = batch_size
        self.seed = seed

    def _device(self) -> Any:
        import torch

        return torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def fit(self, x: Any, y: Any) -> TorchMLP:
        import torch
        from torch import nn

        torch.manual_seed(self.seed)
        device = self._device()
        self.device_ = str(device)  # where it trained (the model itself is kept on the CPU)
        xt = torch.as_tensor(np.asarray(x, dtype=np.float32), device=device)
        if self.task == "classification":
            self.n_outputs_ = int(np.max(y)) + 1
            yt = torch.as_tensor(np.asarray(y, dtype=np.int64), device=device)
            loss_fn: nn.Module = nn.CrossEntropyLoss()
        else:
            y = np.asarray(y, dtype=np.float32)
            self.y_mean_, self.y_std_ = float(y.mean()), float(y.std() or 1.0)
            self.n_outputs_ = 1
            yt = torch.as_tensor(((y - self.y_mean_) / self.y_std_).reshape(-1, 1), device=device)
            loss_fn = nn.MSELoss()
        self.n_inputs_ = int(xt.shape[1])
        self.model_ = self._network().to(device)
        opt = torch.optim.AdamW(self.model_.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        n = xt.shape[0]
        self.model_.train()
        for _ in range(self.epochs):
            order = torch.randperm(n, generator=generator).to(device)
            for step, start in enumerate(range(0, n, self.batch_size)):
                if step % STOP_CHECK_STEPS == 0 and _stop_requested():
                    raise FitStopped
                idx = order[start : start + self.batch_size]
                opt.zero_grad()
                loss = loss_fn(self.model_(xt[idx]), yt[idx])
                loss.backward()
                opt.step()
        self.model_.eval()
        self.model_.cpu()  # serve and pickle from the CPU, whatever trained it
        return self

    def _network(self) -> Any:
        from torch import nn

        blocks: list[nn.Module] = []
        width = self.n_inputs_
        for _ in range(self.layers):
            blocks += [nn.Linear(width, self.hidden), nn.ReLU(), nn.Dropout(self.dropout)]
            width = self.hidden
        blocks.append(nn.Linear(width, self.n_outputs_))
        return nn.Sequential(*blocks)

    # Saved as plain values plus the network's state_dict (torch.save bytes), read back with
    # torch.load(weights_only=True) into a network this class builds: no pickled module, so skops
    # can store it with an allowlist of this class alone.
    def __getstate__(self) -> dict[str, Any]:
        import io

        import torch

        state = dict(self.__dict__)
        model = state.pop("model_", None)
        if model is not None:
            buffer = io.BytesIO()
            torch.save(model.state_dict(), buffer)
            state["weights_"] = buffer.getvalue()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        import io

        import torch

        weights = state.pop("weights_", None)
        self.__dict__.update(state)
        if weights is not None:
            self.model_ = self._network()
            self.model_.load_state_dict(torch.load(io.BytesIO(weights), weights_only=True))
            self.model_.eval()

    def _forward(self, x: Any) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model_(torch.as_tensor(np.asarray(x, dtype=np.float32)))
        return out.numpy()  # type: ignore[no-any-return]

    def predict_proba(self, x: Any) -> np.ndarray:
        logits = self._forward(x)
        e = np.exp(logits - logits.max(axis=1, keepdims=True))
        return e / e.sum(axis=1, keepdims=True)  # type: ignore[no-any-return]

    def predict(self, x: Any) -> np.ndarray:
        if self.task == "classification":
            return np.asarray(np.argmax(self._forward(x), axis=1))
        return np.asarray(self._forward(x).ravel() * self.y_std_ + self.y_mean_)


class TorchMLPRegressor(RegressorMixin, TorchMLP):  # type: ignore[misc]
    pass


class TorchMLPClassifier(ClassifierMixin, TorchMLP):  # type: ignore[misc]
    pass
