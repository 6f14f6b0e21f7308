"""A deployment's live traffic from the platform's own metrics, as Prometheus keeps them: requests
and errors per second and p95 latency over the last minutes, and the totals."""

from __future__ import annotations

import time
from typing import Any

import httpx

from miniml.errors import UpstreamUnavailable

# The deployment's name is a slug (checked when it was made): safe inside a PromQL string.
QUERIES = {
    "requests_per_s": 'sum(rate(miniml_inference_requests_total{{deployment="{d}"}}[1m]))',
    "errors_per_s": 'sum(rate(miniml_inference_requests_total{{deployment="{d}",status!="200"}}[1m]))',
    "p95_latency_ms": "1000 * histogram_quantile(0.95, sum by (le) "
    '(rate(miniml_inference_request_duration_seconds_bucket{{deployment="{d}"}}[1m])))',
}
TOTALS = {
    "requests": 'sum(miniml_inference_requests_total{{deployment="{d}"}})',
    "errors": 'sum(miniml_inference_requests_total{{deployment="{d}",status!="200"}})',
}


def _ask(client: httpx.Client, path: str, params: dict[str, Any]) -> list[dict[str, Any]]:
    answer = client.get(path, params=params)
    answer.raise_for_status()
    body = answer.json()
    if body.get("status") != "success":
        raise ValueError(str(body.get("error", body))[:300])
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def deployment_traffic(prometheus_url: str, deployment: str, minutes: int, step_s: int) -> dict[str, Any]:
    end = time.time()
    start = end - minutes * 60
    series: dict[str, list[list[float]]] = {}
    totals: dict[str, float] = {}
    try:
        with httpx.Client(base_url=prometheus_url.rstrip("/"), timeout=5) as client:
            for name, query in QUERIES.items():
                found = _ask(
                    client,
                    "/api/v1/query_range",
                    {"query": query.format(d=deployment), "start": start, "end": end, "step": step_s},
                )
                points = found[0]["values"] if found else []
                series[name] = [[float(t), float(v)] for t, v in points if v not in ("NaN", "+Inf", "-Inf")]
            for name, query in TOTALS.items():
                found = _ask(client, "/api/v1/query", {"query": query.format(d=deployment)})
                totals[name] = float(found[0]["value"][1]) if found else 0.0
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise UpstreamUnavailable(
            f"Prometheus at {prometheus_url} did not answer the traffic queries ({type(exc).__name__}); "
            "miniml up starts it when the prometheus binary is installed, or set monitoring.prometheus_url."
        ) from exc
    return {"deployment": deployment, "minutes": minutes, "step_s": step_s, "series": series, "totals": totals}
