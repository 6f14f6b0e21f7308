"""The console's one way into the platform: the api's public routes, called with the signed-in
person's own token, in process (no port, no network), through the api's whole stack."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
from starlette.types import ASGIApp


class ApiError(Exception):
    """An answer of the api other than 2xx: its status and the problem's detail, to show as is."""

    def __init__(self, status: int, detail: str, title: str = "") -> None:
        super().__init__(detail)
        self.status, self.detail, self.title = status, detail, title


def _problem(response: httpx.Response) -> ApiError:
    try:
        body = response.json()
    except ValueError:
        body = {}
    if not isinstance(body, dict):
        body = {}
    detail = body.get("detail")
    if isinstance(detail, list):  # FastAPI's validation errors: where and what
        detail = "; ".join(f"{'.'.join(str(p) for p in d.get('loc', [])[1:])}: {d.get('msg')}" for d in detail)
    return ApiError(response.status_code, str(detail or response.reason_phrase), str(body.get("title", "")))


class Api:
    def __init__(self, app: ASGIApp, token: str | None = None, client_host: str = "127.0.0.1") -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        transport = httpx.ASGITransport(app=app, client=(client_host, 0))
        self._http = httpx.AsyncClient(transport=transport, base_url="http://miniml", headers=headers, timeout=120)

    async def __aenter__(self) -> Api:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._http.aclose()

    async def call(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self._http.request(method, path, **kwargs)
        if response.status_code >= 400:
            raise _problem(response)
        return None if response.status_code == 204 or not response.content else response.json()

    async def get(self, path: str, **params: Any) -> Any:
        return await self.call("GET", path, params={k: v for k, v in params.items() if v is not None})

    async def post(self, path: str, json: Any = None, **kwargs: Any) -> Any:
        return await self.call("POST", path, json=json, **kwargs)

    async def stream_to(self, path: str, body: AsyncIterator[bytes], content_type: str) -> Any:
        """Hand a request body (an upload) to the api as it arrives, never held whole."""
        return await self.call("POST", path, content=body, headers={"Content-Type": content_type})

    async def content(self, path: str) -> tuple[bytes, str]:
        """A small binary answer (a plot): its bytes and type."""
        response = await self._http.get(path)
        if response.status_code >= 400:
            raise _problem(response)
        return response.content, response.headers.get("content-type", "application/octet-stream")

    async def download(self, path: str) -> httpx.Response:
        request = self._http.build_request("GET", path)
        response = await self._http.send(request, stream=True)
        if response.status_code >= 400:
            await response.aread()
            raise _problem(response)
        return response
