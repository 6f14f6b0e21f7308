"""What this replica serves, and reconciling it with the api's desired state.

A swap loads every new model first and then replaces the deployment's variants in one
assignment; requests already holding the old variants finish on them. A model that fails to
load leaves the old one serving and the error visible on the deployment.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import anyio
import httpx

from miniml.errors import NotFound
from miniml.inference.models import LoadedModel, load, parse_rows
from miniml.monitoring.metrics import InferenceMetrics

log = logging.getLogger("miniml.inference")


@dataclass
class Variant:
    version: str
    weight: int
    model: LoadedModel


@dataclass
class ShadowStats:
    """Live vs. shadow for one deployment: sums, and the latest pairs (bounded)."""

    version: str
    requests: int = 0
    rows: int = 0
    agree: int = 0
    abs_diff: float = 0.0
    live_s: float = 0.0
    shadow_s: float = 0.0
    records: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=500))

    def add(self, live: list[Any], shadow: list[Any], live_s: float, shadow_s: float) -> None:
        self.requests += 1
        self.rows += len(live)
        self.live_s += live_s
        self.shadow_s += shadow_s
        for a, b in zip(live, shadow, strict=True):
            if isinstance(a, int | float) and isinstance(b, int | float) and not isinstance(a, bool):
                self.abs_diff += abs(float(a) - float(b))
            self.agree += int(a == b)
            self.records.append({"live": a, "shadow": b})

    def report(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "requests": self.requests,
            "rows": self.rows,
            "agree": self.agree,
            "abs_diff": self.abs_diff,
            "live_s": self.live_s,
            "shadow_s": self.shadow_s,
            "records": list(self.records),
        }


@dataclass
class Served:
    project: str
    name: str
    registered: str
    variants: list[Variant]
    error: str | None = None
    shadow: Variant | None = None
    shadow_fraction: float = 0.0

    def pick(self) -> Variant:
        if len(self.variants) == 1:
            return self.variants[0]
        return random.choices(self.variants, weights=[v.weight for v in self.variants])[0]  # noqa: S311


@dataclass
class State:
    tracking_uri: str
    max_batch_rows: int
    metrics: InferenceMetrics
    signing_key: bytes
    served: dict[str, Served] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    # Versions a rollout refused (failed load aside): (registered, version, allowed, live) → why.
    refused: dict[tuple[str, str, bool, frozenset[tuple[str, str]]], str] = field(default_factory=dict)
    rollouts: dict[str, dict[str, str]] = field(default_factory=dict)
    cache: dict[tuple[str, str], LoadedModel] = field(default_factory=dict)
    shadows: dict[str, ShadowStats] = field(default_factory=dict)
    reconciled_once: bool = False
    ready: bool = False
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def endpoint(self, name: str) -> Served:
        served = self.served.get(name)
        if served is None or not served.variants:
            raise NotFound(f"No endpoint {name!r} is served here; deploy a model under that name first.")
        return served

    async def apply(self, desired: list[dict[str, Any]]) -> None:
        async with self.lock:
            wanted: dict[str, Served] = {}
            errors: dict[str, str] = {}
            rollouts: dict[str, dict[str, str]] = {}
            for d in desired:
                variants: list[Variant] = []
                error = d.get("error")
                live = self.served.get(d["name"])
                live_keys = frozenset((live.registered, v.version) for v in live.variants) if live else frozenset()
                allow = bool(d.get("allow_schema_change"))
                for v in d["variants"]:
                    key = (d["registered_name"], str(v["version"]))
                    refused = self.refused.get((*key, allow, live_keys))
                    model = self.cache.get(key)
                    fresh = model is None
                    if refused is None and model is None:
                        try:
                            model = await anyio.to_thread.run_sync(self._load, *key)
                        except Exception as exc:
                            error = f"version {key[1]} failed to load: {type(exc).__name__}: {str(exc)[:300]}"
                            log.warning("model load failed", extra={"deployment": d["name"], "error": error})
                            rollouts[d["name"]] = {"version": key[1], "reason": error}
                            variants = []
                            break
                    if refused is None and model is not None and key not in live_keys:
                        refused = await self._rollout_check(model, live, allow)
                        if refused is not None:
                            self.refused[(*key, allow, live_keys)] = refused
                            if fresh:
                                model.batcher.close()
                    if refused is not None or model is None:
                        error = f"rollout of version {key[1]} refused: {refused}"
                        rollouts[d["name"]] = {"version": key[1], "reason": error}
                        log.warning("rollout refused", extra={"deployment": d["name"], "error": error})
                        variants = []
                        break
                    self.cache[key] = model
                    variants.append(Variant(version=key[1], weight=int(v["weight"]), model=model))
                shadow = None
                spec = d.get("shadow")
                if variants and spec:
                    key = (d["registered_name"], str(spec["version"]))
                    try:
                        cached = self.cache.get(key)
                        shadow_model = (
                            cached if cached is not None else await anyio.to_thread.run_sync(self._load, *key)
                        )
                        self.cache[key] = shadow_model
                        shadow = Variant(version=key[1], weight=0, model=shadow_model)
                    except Exception as exc:
                        error = f"shadow version {key[1]} failed to load: {type(exc).__name__}: {str(exc)[:300]}"
                    stats = self.shadows.get(d["name"])
                    if stats is None or stats.version != key[1]:
                        self.shadows[d["name"]] = ShadowStats(version=key[1])
                if variants:
                    wanted[d["name"]] = Served(
                        d["project"],
                        d["name"],
                        d["registered_name"],
                        variants,
                        shadow=shadow,
                        shadow_fraction=float(spec["fraction"]) if spec and shadow else 0.0,
                    )
                elif d["name"] in self.served:
                    wanted[d["name"]] = self.served[d["name"]]  # keep serving the old versions
                if error:
                    errors[d["name"]] = error
            self.served = wanted  # the switch: one assignment
            self.errors = errors
            self.rollouts = rollouts
            if len(self.refused) > 1000:
                self.refused.clear()
            used = {
                (s.registered, v.version)
                for s in wanted.values()
                for v in [*s.variants, *([s.shadow] if s.shadow else [])]
            }
            self.shadows = {k: v for k, v in self.shadows.items() if k in wanted and wanted[k].shadow is not None}
            for key in list(self.cache):
                if key not in used:
                    self.cache.pop(key).batcher.close()
            self.metrics.loaded_models.set(len(self.cache))
            self.reconciled_once = True
            self.ready = all(name in wanted for name in (d["name"] for d in desired)) and not any(
                d["name"] in errors and d["name"] not in wanted for d in desired
            )

    async def _rollout_check(self, model: LoadedModel, live: Served | None, allow_schema_change: bool) -> str | None:
        """Why a loaded version may not take traffic, or None: the columns callers send now must be
        enough for it (unless the caller allowed a schema change), and it must predict its example rows."""
        if live is not None and not allow_schema_change:
            taken: dict[str, str] = {}
            for v in live.variants:
                for column in v.model.columns:
                    taken.setdefault(column.name, column.kind)
            serving = ", ".join(v.version for v in live.variants)
            needs = [c.name for c in model.columns if c.name not in taken]
            if needs:
                return (
                    f"it needs column(s) {', '.join(needs)} that version(s) {serving} now serving do not take, so "
                    'callers do not send them; deploy it with "allow_schema_change": true once they do.'
                )
            changed = [
                f"{c.name} ({taken[c.name]} now, {c.kind} in it)"
                for c in model.columns
                if "any" not in (c.kind, taken[c.name]) and c.kind != taken[c.name]
            ]
            if changed:
                return (
                    f"column(s) {', '.join(changed)} change type from version(s) {serving} now serving; "
                    'deploy it with "allow_schema_change": true once callers send the new types.'
                )
        if model.example:
            try:
                columns, rows, _ignored = parse_rows({"rows": model.example}, model, max_rows=len(model.example))
                predictions, _ = await model.batcher.predict(columns, rows, False)
            except Exception as exc:
                return f"its smoke prediction on {len(model.example)} example rows failed: {type(exc).__name__}: {str(exc)[:300]}"
            if len(predictions) != rows:
                return f"its smoke prediction answered {len(predictions)} predictions for {rows} example rows"
        return None

    def _load(self, registered: str, version: str) -> LoadedModel:
        import gc

        model = load(
            self.tracking_uri, registered, version, max_batch_rows=self.max_batch_rows, signing_key=self.signing_key
        )
        self.metrics.load_seconds.observe(model.load_seconds)
        gc.collect()
        gc.freeze()  # loaded models are long-lived: keep them out of every later collection
        return model

    def report(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for name, s in self.served.items():
            out[name] = {
                "versions": [v.version for v in s.variants],
                "ready": name not in self.errors,
                "error": self.errors.get(name),
            }
            if name in self.rollouts:
                out[name]["rollout_failed"] = self.rollouts[name]
            if name in self.shadows:
                out[name]["shadow"] = self.shadows[name].report()
        for name, error in self.errors.items():
            out.setdefault(name, {"versions": [], "ready": False, "error": error})
            if name in self.rollouts:
                out[name]["rollout_failed"] = self.rollouts[name]
        return out


class ApiLink:
    """The replica's view of the api: desired state, replica reports, and key checks (cached)."""

    def __init__(self, api_url: str, api_key: str, *, key_cache_s: float, key_stale_s: float = 0.0) -> None:
        self.http = httpx.AsyncClient(base_url=api_url, headers={"X-API-Key": api_key}, timeout=10)
        # Callers' credentials are checked on a client of their own, which carries none of the
        # service's: the api answers for exactly what the caller sent, never for this replica.
        self.check = httpx.AsyncClient(base_url=api_url, timeout=10)
        self.key_cache_s = key_cache_s
        self.key_stale_s = key_stale_s
        self.keys: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.lookups: dict[str, asyncio.Task[dict[str, Any] | None]] = {}

    async def desired(self) -> list[dict[str, Any]]:
        response = await self.http.get("/api/v1/inference/desired")
        response.raise_for_status()
        data: list[dict[str, Any]] = response.json()
        return data

    async def report(self, replica: str, url: str, status: dict[str, dict[str, Any]]) -> None:
        await self.http.post("/api/v1/inference/replicas", json={"replica": replica, "url": url, "deployments": status})

    async def feedback(self, records: list[Any]) -> None:
        """Joined feedback to the api, which keeps it and computes live quality."""
        body = [r.model_dump(mode="json") for r in records]
        response = await self.http.post("/api/v1/inference/feedback", json=body)
        response.raise_for_status()

    async def whoami(self, headers: dict[str, str]) -> dict[str, Any] | None:
        """The caller behind these credentials, or None when the api refuses them.

        A checked key is trusted for ``key_cache_s``. Under steady traffic the entry is refreshed in
        the background before it runs out, and concurrent misses share one lookup: requests never
        queue behind a burst of key checks to the api.
        """
        import hashlib
        import time

        key, bearer = headers.get("x-api-key", ""), headers.get("authorization", "")
        if key:
            send = {"X-API-Key": key}
        elif bearer[:7].lower() == "bearer " and bearer[7:].strip():
            send = {"Authorization": bearer}
        else:
            return None
        digest = hashlib.sha256(repr(sorted(send.items())).encode()).hexdigest()
        hit = self.keys.get(digest)
        age = time.monotonic() - hit[0] if hit is not None else math.inf
        if hit is not None and age < self.key_cache_s:
            if age > 0.75 * self.key_cache_s and digest not in self.lookups:
                self._lookup(digest, send).add_done_callback(_consume)  # refresh ahead, keep serving
            return hit[1]
        task = self.lookups.get(digest) or self._lookup(digest, send)
        try:
            return await asyncio.shield(task)
        except httpx.HTTPError:
            # The api is not answering (restarting, or busy): a caller it accepted a moment ago keeps
            # predicting for key_stale_s. Revoking a key needs the api, so none is missed meanwhile.
            if hit is not None and hit[1] is not None and age < self.key_stale_s:
                return hit[1]
            raise

    def _lookup(self, digest: str, send: dict[str, str]) -> asyncio.Task[dict[str, Any] | None]:
        async def run() -> dict[str, Any] | None:
            import time

            try:
                started = time.monotonic()
                response = await self.check.get("/api/v1/auth/whoami", headers=send)
                if response.status_code >= 500 or response.status_code == 429:
                    response.raise_for_status()
                try:
                    who = response.json() if response.status_code == 200 else None
                except ValueError as exc:  # not the api answering: do not cache, let the caller retry
                    raise httpx.DecodingError("the key check's answer is not JSON", request=response.request) from exc
                if len(self.keys) > 10_000:
                    self.keys.clear()
                self.keys[digest] = (started, who)
                return who
            finally:
                self.lookups.pop(digest, None)

        task = self.lookups[digest] = asyncio.get_running_loop().create_task(run())
        return task


def _consume(task: asyncio.Task[Any]) -> None:
    """A background refresh that failed: the next request past the deadline looks the key up again."""
    if not task.cancelled():
        task.exception()
