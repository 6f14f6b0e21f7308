"""GPU metrics: NVML faked at its boundary (the ``pynvml`` module's calls), and the real NVML on
this machine, which reports what it has: nothing at all when there is no GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from miniml.monitoring.gpu import GpuCollector, visible_gpus
from tests.conftest import free_port
from tests.orchestration.conftest import wait_for


class FakeNVMLError(Exception):
    pass


@dataclass
class Device:
    name: bytes
    uuid: str
    busy: int  # percent
    used: int
    total: int
    broken: bool = False


class FakeNVML:
    """The calls of ``pynvml`` the collector makes, over a list of devices."""

    NVMLError = FakeNVMLError

    def __init__(self, devices: list[Device]) -> None:
        self.devices = devices

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Device:
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: Device) -> bytes:
        return handle.name

    def nvmlDeviceGetUUID(self, handle: Device) -> str:
        return handle.uuid

    def nvmlDeviceGetUtilizationRates(self, handle: Device) -> Any:
        if handle.broken:
            raise FakeNVMLError("GPU is lost")
        return type("Rates", (), {"gpu": handle.busy, "memory": 0})()

    def nvmlDeviceGetMemoryInfo(self, handle: Device) -> Any:
        return type("Memory", (), {"used": handle.used, "total": handle.total, "free": handle.total - handle.used})()


def samples(collector: GpuCollector) -> dict[tuple[str, str], float]:
    registry = CollectorRegistry()
    registry.register(collector)
    found = {}
    for family in registry.collect():
        for sample in family.samples:
            found[(sample.name, sample.labels["gpu"])] = sample.value
    return found


def test_each_gpu_reports_its_utilisation_and_memory() -> None:
    nvml = FakeNVML(
        [
            Device(b"NVIDIA H200", "GPU-aaa", busy=87, used=40 * 2**30, total=141 * 2**30),
            Device(b"NVIDIA L4", "GPU-bbb", busy=0, used=2**20, total=24 * 2**30),
        ]
    )
    got = samples(GpuCollector(nvml))
    assert got[("miniml_gpu_utilization_ratio", "0")] == pytest.approx(0.87)
    assert got[("miniml_gpu_utilization_ratio", "1")] == 0.0
    assert got[("miniml_gpu_memory_used_bytes", "0")] == 40 * 2**30
    assert got[("miniml_gpu_memory_total_bytes", "1")] == 24 * 2**30
    text = generate_latest(_registry(GpuCollector(nvml))).decode()
    assert 'name="NVIDIA H200"' in text and 'uuid="GPU-bbb"' in text
    assert visible_gpus(nvml) == ["GPU 0 NVIDIA H200", "GPU 1 NVIDIA L4"]


def test_a_gpu_that_fails_to_answer_is_left_out_and_the_others_still_report() -> None:
    nvml = FakeNVML(
        [
            Device(b"A", "GPU-a", busy=10, used=1, total=2, broken=True),
            Device(b"B", "GPU-b", busy=30, used=1, total=2),
        ]
    )
    got = samples(GpuCollector(nvml))
    assert {gpu for _, gpu in got} == {"1"}
    assert got[("miniml_gpu_utilization_ratio", "1")] == pytest.approx(0.3)


def test_no_device_means_no_series() -> None:
    assert samples(GpuCollector(FakeNVML([]))) == {}
    assert visible_gpus(FakeNVML([])) == []


def _registry(collector: GpuCollector) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(collector)
    return registry


def _has_gpu() -> bool:
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def test_this_machine_reports_the_gpus_it_has_and_nothing_without() -> None:
    """The real NVML: on a machine without an NVIDIA GPU (CI) the collector yields nothing and
    nothing fails; on one with a GPU it yields every series for each device."""
    got = samples(GpuCollector())
    if _has_gpu():
        assert got and all(name.startswith("miniml_gpu_") for name, _ in got)
    else:
        assert got == {}
        assert visible_gpus() == []


def test_the_workers_metrics_have_no_gpu_series_without_a_gpu(tmp_path: Path) -> None:
    """A real `miniml worker`'s /metrics: its own gauges are there, GPU series only with a GPU."""
    port = free_port()
    env = dict(
        os.environ,
        MINIML_DATA_DIR=str(tmp_path),
        MINIML_WORKER__METRICS_PORT=str(port),
        MINIML_PREFECT__API_URL=f"http://127.0.0.1:{free_port()}/api",  # nothing there: it waits, serving /metrics
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "miniml", "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        text = ""

        def scraped() -> bool:
            nonlocal text
            try:
                text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read().decode()
            except OSError:
                return False
            return True

        wait_for(scraped, 60, "the worker's /metrics")
        assert "miniml_worker_info{" in text
        assert ("miniml_gpu_utilization_ratio{" in text) == _has_gpu()
    finally:
        proc.terminate()
        proc.wait(20)
