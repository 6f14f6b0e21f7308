"""The CUDA path, checked on a machine with an NVIDIA GPU (one short run):

    .venv/bin/python -m bench.gpu_check

It prints what NVML reports (the worker's GPU series), fits the PyTorch family's MLP on the CPU and
on CUDA with the same data and seed (time ratio CPU / CUDA), and checks that the CUDA-trained
model predicts from the CPU as the inference service does.
"""

from __future__ import annotations

import pickle
import time

import numpy as np
import torch
from prometheus_client import CollectorRegistry, generate_latest
from sklearn.datasets import make_classification

from miniml.monitoring.gpu import GpuCollector, visible_gpus
from miniml.training.estimators import TorchMLPClassifier


def fit(x: np.ndarray, y: np.ndarray, device: str) -> tuple[TorchMLPClassifier, float]:
    model = TorchMLPClassifier(task="classification", hidden=128, layers=3, epochs=5, batch_size=512, seed=0)
    model._device = lambda: torch.device(device)  # type: ignore[method-assign]
    started = time.perf_counter()
    model.fit(x, y)
    return model, time.perf_counter() - started


def main() -> None:
    print("GPUs (NVML):", visible_gpus() or "none")
    registry = CollectorRegistry()
    registry.register(GpuCollector())
    print("\n".join(line for line in generate_latest(registry).decode().splitlines() if line.startswith("miniml_")))
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: nothing more to check")
        return
    x, y = make_classification(n_samples=200_000, n_features=32, n_informative=16, n_classes=3, random_state=0)
    x = x.astype(np.float32)
    cpu_model, cpu_s = fit(x, y, "cpu")
    cuda_model, cuda_s = fit(x, y, "cuda")
    assert cuda_model.device_.startswith("cuda") and all(p.device.type == "cpu" for p in cuda_model.model_.parameters())
    served = pickle.loads(pickle.dumps(cuda_model))
    accuracy = float((served.predict(x) == y).mean())
    print(f"fit 200,000 x 32, 5 epochs: CPU {cpu_s:.1f}s, CUDA {cuda_s:.1f}s, ratio CPU/CUDA {cpu_s / cuda_s:.1f}x")
    print(
        f"CUDA-trained model predicting from the CPU: train accuracy {accuracy:.3f} (CPU-trained: "
        f"{float((cpu_model.predict(x) == y).mean()):.3f})"
    )


if __name__ == "__main__":
    main()
