"""The Python client: ``miniml.Client(url, api_key=...)``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx

from miniml.errors import ERRORS_BY_STATUS, MiniMLError, UpstreamUnavailable


def raise_for_problem(response: httpx.Response) -> None:
    """Turn an error response into the same exception class the server raised."""
    if response.is_success:
        return
    try:
        body = response.json()
        detail = str(body.get("detail") or body)
    except ValueError:
        body, detail = {}, response.text[:500] or response.reason_phrase
    cls = ERRORS_BY_STATUS.get(response.status_code, MiniMLError)
    extra = {k: v for k, v in body.items() if k not in ("type", "title", "status", "detail")} if body else {}
    err = cls(detail, extra=extra)
    err.status = response.status_code
    raise err


class Client:
    """A miniml api client.

    Args:
        url: the api's base URL, e.g. ``http://127.0.0.1:8000``.
        api_key: an API key (``mml_...``).
        http: an existing ``httpx.Client`` (tests pass the app's TestClient).
        outlast_s: while the api takes no connections (restarting, down), send a call again for up
            to this many seconds before giving up (the worker's calls: a job outlasts an api restart).
            A call that could not connect never reached the api, so sending it again is safe.
    """

    def __init__(
        self,
        url: str = "http://127.0.0.1:8000",
        *,
        api_key: str | None = None,
        timeout: float = 30.0,
        http: httpx.Client | None = None,
        inference_url: str = "http://127.0.0.1:8080",
        outlast_s: float = 0.0,
    ) -> None:
        self.inference_url = inference_url
        self.outlast_s = outlast_s
        # Sent with each request, so two clients may share one httpx.Client (tests do).
        self.headers = {"X-API-Key": api_key} if api_key else {}
        self.http = http or httpx.Client(base_url=url.rstrip("/"), timeout=timeout)
        from miniml.sdk.datasets import Datasets
        from miniml.sdk.deployments import Deployments, MonitorReports
        from miniml.sdk.jobs import JobReports, Jobs
        from miniml.sdk.keys import Keys
        from miniml.sdk.models import Models
        from miniml.sdk.projects import Projects

        self.projects = Projects(self)
        self.keys = Keys(self)
        self.datasets = Datasets(self)
        self.jobs = Jobs(self)
        self.job_reports = JobReports(self)
        self.models = Models(self)
        self.deployments = Deployments(self)
        self.monitor_reports = MonitorReports(self)

    def predict(self, endpoint: str, rows: list[dict[str, Any]], *, probabilities: bool = False) -> dict[str, Any]:
        """Predict with a deployment on the inference service.

        Raises:
            InvalidInput: a column is missing or of the wrong type (the message names it).
            NotFound: no such endpoint, or not in your projects.
        """
        from miniml.sdk.deployments import predict

        return predict(self, self.inference_url, endpoint, rows, probabilities=probabilities)

    def feedback(self, endpoint: str, labels: dict[str, Any]) -> dict[str, Any]:
        """Send true labels for served predictions: ``{prediction_id: label}``.

        Raises:
            NotFound: an id this replica no longer remembers, or an unknown endpoint.
        """
        body = {"feedback": [{"prediction_id": k, "label": v} for k, v in labels.items()]}
        url = f"{self.inference_url.rstrip('/')}/v1/endpoints/{endpoint}/feedback"
        response = self.http.post(url, json=body, headers=self.headers)
        raise_for_problem(response)
        result: dict[str, Any] = response.json()
        return result

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        headers = self.headers | kwargs.pop("headers", {})
        give_up, pause = None, 0.1
        while True:
            try:
                response = self.http.request(method, path, headers=headers, **kwargs)
                break
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                # Refused or not answered while connecting: the call never reached the api. (A
                # connection that broke later may have delivered it: not sent again.)
                now = time.monotonic()
                give_up = now + self.outlast_s if give_up is None else give_up
                if now >= give_up:
                    raise UpstreamUnavailable(f"Cannot reach the miniml api at {self.http.base_url}: {exc}.") from exc
                time.sleep(min(pause, give_up - now))
                pause = min(1.0, pause * 2)  # back within a second of the api's return
            except httpx.TransportError as exc:
                raise UpstreamUnavailable(f"Cannot reach the miniml api at {self.http.base_url}: {exc}.") from exc
        raise_for_problem(response)
        return response

    @contextmanager
    def stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        """A streamed response (downloads); errors raise like ``request``."""
        headers = self.headers | kwargs.pop("headers", {})
        try:
            with self.http.stream(method, path, headers=headers, **kwargs) as response:
                if not response.is_success:
                    response.read()
                    raise_for_problem(response)
                yield response
        except httpx.TransportError as exc:
            raise UpstreamUnavailable(f"Cannot reach the miniml api at {self.http.base_url}: {exc}.") from exc

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
