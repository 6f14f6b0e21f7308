"""The inference service's key cache against a real api: one lookup per burst, refreshed ahead of
its deadline under steady traffic, and a revoked key refused once the cache time has passed."""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx

from miniml.config import Settings
from miniml.inference.state import ApiLink
from tests.conftest import LiveApi, free_port


def whoami_calls(api: LiveApi) -> int:
    text = httpx.get(f"{api.url}/metrics").text
    found = re.findall(r'miniml_api_requests_total\{[^}]*route="/api/v1/auth/whoami"[^}]*\} ([0-9.]+)', text)
    return int(sum(float(v) for v in found))


def test_key_checks_are_shared_refreshed_ahead_and_expire(tmp_path: Path) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
    )
    with LiveApi(settings) as api:
        httpx.post(f"{api.url}/api/v1/projects", json={"name": "keys"}, headers=api.headers).raise_for_status()
        created = httpx.post(
            f"{api.url}/api/v1/keys", json={"role": "viewer", "projects": ["keys"]}, headers=api.headers
        )
        key, key_id = created.json()["key"], created.json()["id"]
        headers = {"x-api-key": key}

        async def scenario() -> None:
            async def calls_reach(n: int, within: float) -> int:
                deadline = time.monotonic() + within
                while whoami_calls(api) - base < n and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                return whoami_calls(api) - base

            link = ApiLink(api.url, api.key, key_cache_s=6)
            base = whoami_calls(api)
            # A burst of 30 requests with a cold cache: one lookup, the same answer for all.
            first = time.monotonic()
            answers = await asyncio.gather(*(link.whoami(headers) for _ in range(30)))
            assert all(a is not None and a["role"] == "viewer" for a in answers)
            assert whoami_calls(api) - base == 1
            # Past 3/4 of the cache time: answered from the cache at once, refreshed behind it.
            await asyncio.sleep(4.7 - (time.monotonic() - first))
            refreshed = time.monotonic()
            assert await link.whoami(headers) is not None
            assert time.monotonic() - refreshed < 0.5
            assert await calls_reach(2, 3) == 2
            # Past the first entry's deadline, the refreshed entry answers without a call.
            await asyncio.sleep(max(0.0, 6.3 - (time.monotonic() - first)))
            assert await link.whoami(headers) is not None
            assert whoami_calls(api) - base == 2
            # Revoked: refused once the cached entry has run out, at most key_cache_s after the
            # revocation (plus a lookup; polled: under load the refresh's own stamp comes later).
            assert httpx.delete(f"{api.url}/api/v1/keys/{key_id}", headers=api.headers).status_code in (200, 204)
            revoked = time.monotonic()
            while await link.whoami(headers) is not None:
                assert time.monotonic() - revoked < 6 + 2, "a revoked key kept working past the cache time"
                await asyncio.sleep(0.1)
            await link.http.aclose()

        asyncio.run(scenario())


def test_an_accepted_key_keeps_predicting_while_the_api_is_away(tmp_path: Path) -> None:
    """The api restarting (connection refused) must not stop predictions of callers it just accepted;
    a caller it never saw, or one it refused, gets nothing from the cache."""
    settings = Settings(
        data_dir=tmp_path / "data",
        api={"port": free_port()},
        mlflow={"port": free_port()},
        prefect={"port": free_port()},
    )
    api = LiveApi(settings).__enter__()
    try:
        httpx.post(f"{api.url}/api/v1/projects", json={"name": "keys"}, headers=api.headers).raise_for_status()
        created = httpx.post(
            f"{api.url}/api/v1/keys", json={"role": "viewer", "projects": ["keys"]}, headers=api.headers
        )
        known = {"x-api-key": created.json()["key"]}
        refused = {"x-api-key": "mml_nope_" + "x" * 32}

        async def scenario() -> None:
            stale = ApiLink(api.url, api.key, key_cache_s=0.2, key_stale_s=30)
            strict = ApiLink(api.url, api.key, key_cache_s=0.2, key_stale_s=0)
            assert (await stale.whoami(known) or {}).get("role") == "viewer"
            assert await strict.whoami(known) is not None
            assert await stale.whoami(refused) is None
            await asyncio.to_thread(api.__exit__, None, None, None)  # the api is gone: its port refuses
            await asyncio.sleep(0.3)
            assert (await stale.whoami(known) or {}).get("role") == "viewer"
            for link, headers in ((strict, known), (stale, refused), (stale, {"x-api-key": "mml_never_seen"})):
                try:
                    await link.whoami(headers)
                except httpx.HTTPError:
                    continue
                raise AssertionError(f"answered without the api: {headers}")

        asyncio.run(scenario())
    finally:
        api.__exit__(None, None, None)
