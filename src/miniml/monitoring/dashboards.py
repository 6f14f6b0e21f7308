"""Grafana dashboards, Prometheus alert rules and scrape configs, defined once in code.

``scripts/dashboards.py`` writes them under ``deploy/`` (compose provisions Grafana and
Prometheus from there; a test keeps the files current), and ``miniml up`` writes the scrape
config and rules for the local processes. Every panel's PromQL is run against a real Prometheus
by the test suite.

Gauges computed from the metadata DB (drift, quality, jobs) are the same on every api replica,
so panels take ``max by (...)`` of them; request counters are per process, so panels ``sum``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

RATE = "$__rate_interval"
DEP = 'deployment=~"$deployment"'
DATASOURCE = {"type": "prometheus", "uid": "prometheus"}

# Scrape jobs: the names dashboards and alert rules refer to.
API_JOB, INFERENCE_JOB, WORKER_JOB = "miniml-api", "miniml-inference", "miniml-worker"


@dataclass(frozen=True)
class Panel:
    title: str
    queries: tuple[tuple[str, str], ...]  # (PromQL, legend)
    unit: str = "short"
    kind: str = "timeseries"
    description: str = ""


SERVING = (
    Panel(
        "Requests per second",
        ((f"sum by (deployment) (rate(miniml_inference_requests_total{{{DEP}}}[{RATE}]))", "{{deployment}}"),),
        "reqps",
    ),
    Panel(
        "p95 latency",
        (
            (
                f"histogram_quantile(0.95, sum by (le, deployment) "
                f"(rate(miniml_inference_request_duration_seconds_bucket{{{DEP}}}[{RATE}])))",
                "{{deployment}}",
            ),
        ),
        "s",
    ),
    Panel(
        "Errors per second",
        (
            (
                f"sum by (deployment, reason) (rate(miniml_inference_errors_total{{{DEP}}}[{RATE}]))",
                "{{deployment}} {{reason}}",
            ),
        ),
        "reqps",
        description="invalid_input: a bad request (4xx); model_error: the model failed (5xx).",
    ),
    Panel(
        "Total requests",
        ((f"sum by (deployment) (miniml_inference_requests_total{{{DEP}}})", "{{deployment}}"),),
        kind="stat",
    ),
    Panel(
        "Requests per second by version",
        (
            (
                f"sum by (deployment, version) (rate(miniml_inference_requests_total{{{DEP}}}[{RATE}]))",
                "{{deployment}} v{{version}}",
            ),
        ),
        "reqps",
    ),
    Panel(
        "Rows predicted per second",
        ((f"sum by (deployment) (rate(miniml_inference_rows_total{{{DEP}}}[{RATE}]))", "{{deployment}}"),),
    ),
    Panel(
        "API requests per second",
        ((f"sum by (route) (rate(miniml_api_requests_total[{RATE}]))", "{{route}}"),),
        "reqps",
    ),
    Panel(
        "API p95 latency",
        (
            (
                f"histogram_quantile(0.95, sum by (le, route) (rate(miniml_api_request_duration_seconds_bucket[{RATE}])))",
                "{{route}}",
            ),
        ),
        "s",
    ),
    Panel(
        "API errors per second",
        ((f'sum by (status) (rate(miniml_api_requests_total{{status=~"[45].."}}[{RATE}]))', "{{status}}"),),
        "reqps",
    ),
    Panel("API total requests", (("sum(miniml_api_requests_total)", "requests"),), kind="stat"),
)

DRIFT_QUALITY = (
    Panel(
        "Feature drift (PSI)",
        ((f"max by (deployment, feature) (miniml_feature_drift_psi{{{DEP}}})", "{{deployment}} {{feature}}"),),
        description="Latest drift check per feature: < 0.1 stable, 0.1 to 0.25 moderate, > 0.25 drifted.",
    ),
    Panel(
        "Prediction drift (PSI)",
        ((f"max by (deployment) (miniml_prediction_drift_psi{{{DEP}}})", "{{deployment}}"),),
    ),
    Panel(
        "KS statistic",
        ((f"max by (deployment, feature) (miniml_feature_drift_ks{{{DEP}}})", "{{deployment}} {{feature}}"),),
    ),
    Panel(
        "Rows in the latest check",
        ((f"max by (deployment) (miniml_drift_rows{{{DEP}}})", "{{deployment}}"),),
        kind="stat",
    ),
    Panel(
        "Live quality",
        ((f"max by (deployment, metric) (miniml_model_quality{{{DEP}}})", "{{deployment}} {{metric}}"),),
        description="From feedback (true labels) in the quality window: accuracy and f1_macro, or rmse and mae.",
    ),
    Panel(
        "Predictions with feedback",
        ((f"max by (deployment) (miniml_model_feedback_labelled{{{DEP}}})", "{{deployment}}"),),
        kind="stat",
    ),
    Panel(
        "Captured rows per second",
        ((f"sum by (deployment) (rate(miniml_inference_capture_rows_total{{{DEP}}}[{RATE}]))", "{{deployment}}"),),
    ),
)

TRAINING = (
    Panel(
        "Jobs queued, running, failed",
        (('max by (state) (miniml_jobs{state=~"queued|running|failed"})', "{{state}}"),),
    ),
    Panel("Jobs by state and kind", (("max by (state, kind) (miniml_jobs)", "{{kind}} {{state}}"),), kind="stat"),
    Panel(
        "Job duration (last 24 h)",
        (("max by (stat) (miniml_job_duration_seconds)", "{{stat}}"),),
        "s",
    ),
    Panel(
        "Trials per minute",
        ((f"60 * sum by (state) (rate(miniml_job_trials_total[{RATE}]))", "{{state}}"),),
    ),
    Panel("Workers up", ((f'sum(up{{job="{WORKER_JOB}"}})', "workers"),), kind="stat"),
    Panel(
        "Worker memory",
        ((f'process_resident_memory_bytes{{job="{WORKER_JOB}"}}', "{{instance}}"),),
        "bytes",
    ),
    Panel(
        "GPU utilisation",
        (("max by (instance, gpu, name) (miniml_gpu_utilization_ratio)", "{{instance}} GPU {{gpu}} {{name}}"),),
        "percentunit",
        description="From NVML on each worker; empty where workers have no GPU.",
    ),
    Panel(
        "GPU memory used",
        (
            (
                "max by (instance, gpu, name) (miniml_gpu_memory_used_bytes / miniml_gpu_memory_total_bytes)",
                "{{instance}} GPU {{gpu}} {{name}}",
            ),
        ),
        "percentunit",
        description="Share of each GPU's memory in use (NVML); empty where workers have no GPU.",
    ),
)

DASHBOARDS: dict[str, tuple[str, tuple[Panel, ...]]] = {
    "miniml-serving": ("miniml: serving", SERVING),
    "miniml-drift-quality": ("miniml: drift and model quality", DRIFT_QUALITY),
    "miniml-training": ("miniml: training jobs", TRAINING),
}


def _panel(panel: Panel, index: int) -> dict[str, Any]:
    width = 6 if panel.kind == "stat" else 12
    return {
        "id": index + 1,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": width, "x": (index % 2) * 12, "y": (index // 2) * 8},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if panel.kind == "timeseries" else {},
        "targets": [
            {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend}
            for i, (expr, legend) in enumerate(panel.queries)
        ],
    }


def dashboard(uid: str) -> dict[str, Any]:
    """One dashboard as Grafana's JSON model (schema 39), with a $deployment variable."""
    title, panels = DASHBOARDS[uid]
    return {
        "uid": uid,
        "title": title,
        "tags": ["miniml"],
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {
            "list": [
                {
                    "name": "deployment",
                    "label": "Deployment",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {"query": "label_values(miniml_inference_requests_total, deployment)", "refId": "vars"},
                    "definition": "label_values(miniml_inference_requests_total, deployment)",
                    "refresh": 2,
                    "includeAll": True,
                    "multi": True,
                    "allValue": ".*",
                    "current": {"text": "All", "value": "$__all"},
                }
            ]
        },
        "panels": [_panel(p, i) for i, p in enumerate(panels)],
    }


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel, PromQL) for every query of every panel."""
    return [
        (uid, panel.title, expr)
        for uid, (_, panels) in DASHBOARDS.items()
        for panel in panels
        for expr, _ in panel.queries
    ]


def alert_rules() -> dict[str, Any]:
    """Prometheus alerting rules: error rate, p95 latency, drift, stuck jobs, targets down."""
    rate = "5m"
    return {
        "groups": [
            {
                "name": "miniml-serving",
                "rules": [
                    {
                        "alert": "MinimlInferenceErrorRate",
                        "expr": f"sum by (deployment) (rate(miniml_inference_errors_total[{rate}])) / "
                        f"sum by (deployment) (rate(miniml_inference_requests_total[{rate}])) > 0.05",
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "Deployment {{ $labels.deployment }}: over 5% of predict requests fail",
                            "description": "Error ratio {{ $value | humanizePercentage }} over 5 minutes.",
                        },
                    },
                    {
                        "alert": "MinimlInferenceLatencyP95",
                        "expr": "histogram_quantile(0.95, sum by (le, deployment) "
                        f"(rate(miniml_inference_request_duration_seconds_bucket[{rate}]))) > 0.25",
                        "for": "10m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "Deployment {{ $labels.deployment }}: p95 latency above 250 ms",
                            "description": "p95 is {{ $value | humanizeDuration }}.",
                        },
                    },
                    {
                        "alert": "MinimlApiErrors",
                        "expr": f'sum(rate(miniml_api_requests_total{{status=~"5.."}}[{rate}])) > 0',
                        "for": "5m",
                        "labels": {"severity": "warning"},
                        "annotations": {"summary": "The miniml api answers 5xx"},
                    },
                    {
                        "alert": "MinimlTargetDown",
                        "expr": f'up{{job=~"{API_JOB}|{INFERENCE_JOB}|{WORKER_JOB}"}} == 0',
                        "for": "2m",
                        "labels": {"severity": "critical"},
                        "annotations": {"summary": "{{ $labels.job }} at {{ $labels.instance }} is down"},
                    },
                ],
            },
            {
                "name": "miniml-drift",
                "rules": [
                    {
                        "alert": "MinimlFeatureDrift",
                        "expr": "max by (deployment, feature) (miniml_feature_drift_psi) > 0.25",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "Deployment {{ $labels.deployment }}: feature {{ $labels.feature }} drifted",
                            "description": 'PSI {{ $value | printf "%.2f" }} against the training data (> 0.25).',
                        },
                    },
                    {
                        "alert": "MinimlPredictionDrift",
                        "expr": "max by (deployment) (miniml_prediction_drift_psi) > 0.25",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "Deployment {{ $labels.deployment }}: predictions drifted from the training target"
                        },
                    },
                ],
            },
            {
                "name": "miniml-training",
                "rules": [
                    {
                        "alert": "MinimlJobsStuckQueued",
                        "expr": 'max(miniml_jobs{state="queued"}) > 0',
                        "for": "15m",
                        "labels": {"severity": "warning"},
                        "annotations": {
                            "summary": "Jobs wait in the queue: is a worker running? (/readyz names what is missing)"
                        },
                    }
                ],
            },
        ]
    }


def scrape_config(
    *,
    api: list[str],
    inference: list[str] | None = None,
    worker: list[str] | None = None,
    interval_s: float = 5,
    token_file: str | None = None,
) -> dict[str, Any]:
    """A Prometheus config scraping the given host:port targets, with the rules file beside it.

    ``token_file``: the scrape token (monitoring.metrics_token) that the api's and inference's
    /metrics ask for; the worker's metrics server binds a private interface instead.
    """
    jobs = [(API_JOB, api), (INFERENCE_JOB, inference or []), (WORKER_JOB, worker or [])]
    configs: list[dict[str, Any]] = []
    for name, targets in jobs:
        if not targets:
            continue
        job: dict[str, Any] = {"job_name": name, "static_configs": [{"targets": targets}]}
        if token_file and name != WORKER_JOB:
            job["authorization"] = {"type": "Bearer", "credentials_file": token_file}
        configs.append(job)
    return {
        "global": {"scrape_interval": f"{interval_s:g}s", "evaluation_interval": f"{interval_s:g}s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": configs,
    }


def compose_scrape_config() -> dict[str, Any]:
    """Compose: the api by name; every inference and worker replica through Docker's DNS."""
    return {
        "global": {"scrape_interval": "5s", "evaluation_interval": "5s"},
        "rule_files": ["alerts.yml"],
        "scrape_configs": [
            {"job_name": API_JOB, "static_configs": [{"targets": ["api:8000"]}]},
            {"job_name": INFERENCE_JOB, "dns_sd_configs": [{"names": ["inference"], "type": "A", "port": 8080}]},
            {"job_name": WORKER_JOB, "dns_sd_configs": [{"names": ["worker"], "type": "A", "port": 9101}]},
        ],
    }
