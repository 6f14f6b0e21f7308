"""Prometheus metrics of the inference service (naming: miniml_<component>_<what>_<unit>)."""

from __future__ import annotations

import logging
import os
import socket

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from miniml.config import Settings

log = logging.getLogger("miniml.worker")


def start_worker_metrics(settings: Settings) -> None:
    """The worker's /metrics: its process (CPU, memory), its GPUs if any, and what it is; Prometheus
    scrapes it."""
    from prometheus_client import REGISTRY, start_http_server

    from miniml.monitoring.gpu import GpuCollector

    port = settings.worker.metrics_port
    if port == 0:
        return
    info = Gauge("miniml_worker_info", "A training worker process.", ["worker"], registry=REGISTRY)
    info.labels(f"{socket.gethostname()}:{os.getpid()}").set(1)
    Gauge("miniml_worker_concurrency", "Flow runs this worker runs at once.", registry=REGISTRY).set(
        settings.worker.concurrency
    )
    REGISTRY.register(GpuCollector())  # no series at all on a machine without a GPU
    try:
        start_http_server(port, addr=settings.worker.metrics_host)
    except OSError as exc:  # another worker on this machine holds the port: train anyway
        log.warning(
            "worker metrics not served",
            extra={"port": port, "error": str(exc), "hint": "set MINIML_WORKER__METRICS_PORT to a free port, or 0"},
        )


class InferenceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "miniml_inference_requests_total",
            "Predict requests by deployment, version and status.",
            ["deployment", "version", "status"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "miniml_inference_request_duration_seconds",
            "Predict latency by deployment and version.",
            ["deployment", "version"],
            registry=self.registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )
        self.rows = Counter(
            "miniml_inference_rows_total", "Rows predicted.", ["deployment", "version"], registry=self.registry
        )
        self.errors = Counter(
            "miniml_inference_errors_total",
            "Failed predict requests by reason.",
            ["deployment", "reason"],
            registry=self.registry,
        )
        self.predictions = Counter(
            "miniml_inference_predictions_total",
            "Predicted labels (classifiers) by deployment and version.",
            ["deployment", "version", "label"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "miniml_inference_model_load_seconds",
            "Time to load a model version.",
            registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.loaded_models = Gauge(
            "miniml_inference_loaded_models", "Model versions in memory.", registry=self.registry
        )
