"""GPU utilisation and memory on a worker's /metrics, read from NVML (``nvidia-ml-py``).

On a machine without an NVIDIA GPU (no driver, no NVML library, or no device) the collector
yields no series at all, so dashboards show nothing there and nothing fails. It never touches
CUDA: trainers fork from the worker, and a process that has initialised CUDA cannot fork a child
that uses it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("miniml.worker")

LABELS = ["gpu", "name", "uuid"]


def _nvml() -> Any | None:
    """NVML, initialised; None where the package, the library or the driver is missing."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no library or no driver: a machine without a GPU
        log.debug("no NVML", extra={"error": str(exc)})
        return None
    return pynvml


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def visible_gpus(nvml: Any | None = None) -> list[str]:
    """The names of the GPUs this process can use (as NVML lists them; none without a GPU)."""
    nvml = nvml if nvml is not None else _nvml()
    if nvml is None:
        return []
    try:
        return [
            f"GPU {i} {_text(nvml.nvmlDeviceGetName(nvml.nvmlDeviceGetHandleByIndex(i)))}"
            for i in range(int(nvml.nvmlDeviceGetCount()))
        ]
    except nvml.NVMLError:
        return []


class GpuCollector(Collector):
    """``miniml_gpu_utilization_ratio``, ``miniml_gpu_memory_used_bytes`` and
    ``miniml_gpu_memory_total_bytes`` per device; nothing without a GPU."""

    def __init__(self, nvml: Any | None = None) -> None:
        self._nvml = nvml if nvml is not None else _nvml()

    @property
    def available(self) -> bool:
        return self._nvml is not None and self.device_count() > 0

    def device_count(self) -> int:
        if self._nvml is None:
            return 0
        try:
            return int(self._nvml.nvmlDeviceGetCount())
        except self._nvml.NVMLError:
            return 0

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml = self._nvml
        if nvml is None:
            return
        utilization = GaugeMetricFamily(
            "miniml_gpu_utilization_ratio",
            "Share of the last sample period a kernel ran on the GPU (NVML), 0 to 1.",
            labels=LABELS,
        )
        used = GaugeMetricFamily("miniml_gpu_memory_used_bytes", "GPU memory in use (NVML).", labels=LABELS)
        total = GaugeMetricFamily("miniml_gpu_memory_total_bytes", "GPU memory in all (NVML).", labels=LABELS)
        for index in range(self.device_count()):
            try:
                handle = nvml.nvmlDeviceGetHandleByIndex(index)
                labels = [str(index), _text(nvml.nvmlDeviceGetName(handle)), _text(nvml.nvmlDeviceGetUUID(handle))]
                rates = nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            except nvml.NVMLError as exc:  # a device gone or in a bad state: skip it this scrape
                log.warning("GPU not read", extra={"gpu": index, "error": str(exc)})
                continue
            utilization.add_metric(labels, float(rates.gpu) / 100.0)
            used.add_metric(labels, float(memory.used))
            total.add_metric(labels, float(memory.total))
        for family in (utilization, used, total):
            if family.samples:
                yield family
