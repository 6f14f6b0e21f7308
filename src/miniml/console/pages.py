"""The console's pages. Each asks the api (``Api``, the public routes) with the person's own token,
so it shows and allows exactly what the api does for that key: a viewer sees no write control, and
whatever a page offers, the api decides again."""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, FastAPI, Form, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.background import BackgroundTask

from miniml.console import charts, session
from miniml.console.client import Api, ApiError
from miniml.monitoring.drift import PSI_DRIFT

HERE = Path(__file__).resolve().parent
templates = Jinja2Templates(directory=HERE / "templates")
templates.env.globals["charts"] = charts
templates.env.filters["num"] = charts._num
templates.env.filters["q"] = lambda value: quote(str(value), safe="")
templates.env.globals["top_items"] = lambda column, n=8: [
    (str(t["value"]), t["count"]) for t in column.get("top", [])[:n]
]
templates.env.globals["psi_drift"] = PSI_DRIFT
templates.env.globals["psi_items"] = lambda features: [(f["feature"], float(f["psi"])) for f in features]
templates.env.globals["missing_items"] = lambda columns: [
    (c["name"], c["null_count"]) for c in columns if c["null_count"]
]

router = APIRouter(prefix="/ui", include_in_schema=False)

# Nothing but this origin: no CDN, no inline script, no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'; object-src 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
_NOSNIFF = {"X-Content-Type-Options": "nosniff"}
ROLES = {"viewer": 1, "engineer": 2, "admin": 3}
FAMILIES = ["linear", "lightgbm", "hist_gradient_boosting", "xgboost", "extra_trees", "random_forest", "torch_mlp"]


def mount(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=HERE / "static"), name="console-static")


def _secret(request: Request) -> str:
    return str(request.app.state.jwt_secret)


def _login_redirect(request: Request, why: str = "") -> Response:
    where = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = f"/ui/login?next={quote(where, safe='')}" + (f"&why={quote(why, safe='')}" if why else "")
    response = RedirectResponse(target, status_code=303)
    session.sign_out(response)
    return response


def _safe_next(value: str | None) -> str:
    """Only a path of the console: never another site (an open redirect)."""
    if value and value.startswith("/ui/") and not value.startswith("//") and "\\" not in value:
        return value
    return "/ui/projects"


class Page:
    """One request of a signed-in person: their api client, who they are, what they may do."""

    def __init__(self, request: Request, api: Api, me: dict[str, Any], token: str) -> None:
        self.request, self.api, self.me, self.token = request, api, me, token
        self.csrf = session.csrf_for(_secret(request), token)

    def can(self, role: str) -> bool:
        return ROLES.get(str(self.me.get("role")), 0) >= ROLES[role]

    def render(self, template: str, status: int = 200, **context: Any) -> HTMLResponse:
        context |= {"me": self.me, "csrf": self.csrf, "can": self.can, "path": self.request.url.path}
        response = templates.TemplateResponse(self.request, template, context, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def problem(self, err: ApiError, back: str | None = None) -> HTMLResponse:
        status = err.status if 400 <= err.status < 600 else 502
        return self.render("error.html", status=status, error=err, back=back)


Handler = Callable[[Page], Awaitable[Response]]


async def _as_person(request: Request, handler: Handler, write: bool = False, csrf: str | None = None) -> Response:
    token = session.token_of(request)
    if token is None:
        return _login_redirect(request)
    async with Api(request.app, token, request.client.host if request.client else "127.0.0.1") as api:
        try:
            me = await api.get("/api/v1/auth/whoami")
        except ApiError as err:
            if err.status == 401:
                return _login_redirect(request, "Your session ended or is not valid: sign in again.")
            unsigned = templates.TemplateResponse(  # the api cannot say who this is now (its DB busy)
                request, "error.html", {"me": None, "error": err, "back": None}, status_code=err.status
            )
            unsigned.headers.update(SECURITY_HEADERS)
            return unsigned
        page = Page(request, api, me, token)
        if write and not session.csrf_ok(_secret(request), token, csrf, request):
            return page.render(
                "error.html",
                status=403,
                error=ApiError(403, "This form is stale or came from another site: reload the page and try again."),
            )
        try:
            return await handler(page)
        except ApiError as err:
            if err.status == 401:
                return _login_redirect(request, "Your session ended: sign in again.")
            return page.problem(err, back=request.headers.get("referer"))


async def _form_write(request: Request, form: Any, handler: Handler) -> Response:
    """A write posted as a form read whole (its CSRF token comes with the other fields)."""
    csrf = form.get("csrf")
    return await _as_person(request, handler, write=True, csrf=str(csrf) if csrf else None)


def _redirect(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303)


# --- sign-in ---------------------------------------------------------------------------------


@router.get("")
@router.get("/")
async def home() -> Response:
    return _redirect("/ui/projects")


@router.get("/login")
async def login_form(request: Request, next: str | None = None, why: str | None = None) -> Response:
    response = templates.TemplateResponse(
        request, "login.html", {"next": _safe_next(next), "why": why, "me": None, "error": None}
    )
    response.headers.update(SECURITY_HEADERS)
    return response


@router.post("/login")
async def login(
    request: Request, api_key: Annotated[str, Form(max_length=512)] = "", next: Annotated[str, Form()] = ""
) -> Response:
    async with Api(request.app, None, request.client.host if request.client else "127.0.0.1") as api:
        try:
            answer = await api.post("/api/v1/auth/token", json={"api_key": api_key.strip()})
        except ApiError as err:
            refused = templates.TemplateResponse(
                request,
                "login.html",
                {"next": _safe_next(next), "why": None, "me": None, "error": err.detail},
                status_code=401 if err.status == 401 else err.status,
            )
            refused.headers.update(SECURITY_HEADERS)
            return refused
    response = _redirect(_safe_next(next))
    session.sign_in(response, request, answer["access_token"], int(answer["expires_in"]))
    return response


@router.post("/logout")
async def logout() -> Response:
    response = _redirect("/ui/login?why=" + quote("Signed out.", safe=""))
    session.sign_out(response)
    return response


# --- projects --------------------------------------------------------------------------------


@router.get("/projects")
async def projects(request: Request) -> Response:
    async def show(page: Page) -> Response:
        return page.render("projects.html", projects=await page.api.get("/api/v1/projects"))

    return await _as_person(request, show)


@router.post("/projects")
async def create_project(
    request: Request, name: Annotated[str, Form(max_length=200)] = "", csrf: Annotated[str, Form()] = ""
) -> Response:
    async def make(page: Page) -> Response:
        made = await page.api.post("/api/v1/projects", json={"name": name.strip()})
        return _redirect(f"/ui/p/{quote(made['name'], safe='')}")

    return await _as_person(request, make, write=True, csrf=csrf)


@router.get("/p/{project}")
async def project(request: Request, project: str) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}"
        info = await page.api.get(base)
        sections: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for part in ("datasets", "jobs", "models", "deployments"):
            try:  # one part out of reach (MLflow restarting) leaves the others to show
                sections[part] = await page.api.get(f"{base}/{part}")
            except ApiError as err:
                if err.status in (401, 403, 404):
                    raise
                sections[part], problems[part] = [], err.detail
        return page.render("project.html", project=info, problems=problems, **sections)

    return await _as_person(request, show)


# --- datasets --------------------------------------------------------------------------------


def _dataset_base(project: str, name: str) -> str:
    return f"/api/v1/projects/{quote(project, safe='')}/datasets/{quote(name, safe='')}"


@router.get("/p/{project}/datasets/{name}")
async def dataset(
    request: Request,
    project: str,
    name: str,
    version: Annotated[int | None, Query(ge=1)] = None,
    rules: Annotated[str | None, Query(max_length=20_000)] = None,
) -> Response:
    async def show(page: Page) -> Response:
        base = _dataset_base(project, name)
        versions = await page.api.get(f"{base}/versions")
        chosen = next((v for v in versions if v["version"] == version), versions[-1] if versions else None)
        preview = await page.api.get(f"{base}/versions/{chosen['version']}/preview", rows=20) if chosen else None
        report, rules_error = None, None
        if chosen and rules and rules.strip():
            try:  # checking rules changes nothing: a GET of the page, a POST to the api's check
                parsed = json.loads(rules)
            except ValueError as exc:
                rules_error = f"The rules are not JSON: {exc}."
            else:
                try:
                    report = await page.api.post(
                        f"{base}/versions/{chosen['version']}/validate", json={"rules": parsed}
                    )
                except ApiError as err:
                    if err.status in (401, 403, 404):
                        raise
                    rules_error = err.detail
        return page.render(
            "dataset.html",
            project=project,
            name=name,
            versions=versions,
            chosen=chosen,
            preview=preview,
            rules=rules or example_rules(chosen),
            report=report,
            rules_error=rules_error,
        )

    return await _as_person(request, show)


def example_rules(version: dict[str, Any] | None) -> str:
    """Rules to start from: the first columns as the profile sees them (a change will break them)."""
    if not version:
        return ""
    rules: dict[str, Any] = {}
    for column in version["profile"]["columns"][:3]:
        rule: dict[str, Any] = {"allow_nulls": column["null_count"] > 0}
        if column["kind"] == "numeric" and column.get("min") is not None:
            rule |= {"min": column["min"], "max": column["max"]}
        rules[column["name"]] = rule
    return json.dumps(rules, indent=1)


@router.get("/p/{project}/datasets/{name}/versions/{version}/file")
async def dataset_file(request: Request, project: str, name: str, version: int) -> Response:
    token = session.token_of(request)
    if token is None:
        return _login_redirect(request)
    api = Api(request.app, token)
    try:
        upstream = await api.download(f"{_dataset_base(project, name)}/versions/{version}/file")
    except ApiError as err:
        await api.__aexit__()
        if err.status == 401:
            return _login_redirect(request)
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    async def close() -> None:
        await upstream.aclose()
        await api.__aexit__()

    headers = {k: v for k, v in upstream.headers.items() if k.lower() in ("content-length", "content-disposition")}
    return StreamingResponse(
        upstream.aiter_raw(),
        media_type=upstream.headers.get("content-type"),
        headers=headers,
        background=BackgroundTask(close),
    )


@router.post("/p/{project}/datasets")
async def upload(request: Request, project: str, csrf: str | None = None, name: str | None = None) -> Response:
    """The browser's multipart body goes to the api's upload route as it arrives (the api streams it
    to storage and checks it); XHR callers get JSON (their progress bar shows the upload)."""
    wants_json = "application/json" in request.headers.get("accept", "")

    async def send(page: Page) -> Response:
        path = f"/api/v1/projects/{quote(project, safe='')}/datasets" + (f"?name={quote(name)}" if name else "")
        try:
            made = await page.api.stream_to(path, request.stream(), request.headers.get("content-type", ""))
        except ApiError as err:
            if wants_json:
                return JSONResponse({"detail": err.detail, "status": err.status}, status_code=err.status)
            raise
        where = f"/ui/p/{quote(project, safe='')}/datasets/{quote(made['dataset'], safe='')}?version={made['version']}"
        return JSONResponse({"location": where} | made) if wants_json else _redirect(where)

    return await _as_person(request, send, write=True, csrf=csrf or request.headers.get("x-csrf-token"))


# --- training --------------------------------------------------------------------------------


@router.get("/p/{project}/jobs/new")
async def new_job(request: Request, project: str, dataset: str | None = None) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}"
        datasets = await page.api.get(f"{base}/datasets")
        chosen = dataset or (datasets[0]["name"] if datasets else None)
        columns: list[dict[str, Any]] = []
        if chosen:
            versions = await page.api.get(f"{_dataset_base(project, chosen)}/versions")
            columns = versions[-1]["profile"]["columns"] if versions else []
        return page.render(
            "job_new.html", project=project, datasets=datasets, chosen=chosen, columns=columns, families=FAMILIES
        )

    return await _as_person(request, show)


@router.post("/p/{project}/jobs")
async def create_job(request: Request, project: str) -> Response:
    form = await request.form()

    async def make(page: Page) -> Response:
        body: dict[str, Any] = {
            "dataset": form.get("dataset"),
            "target": form.get("target"),
            "task": form.get("task") or "auto",
            "families": [str(f) for f in form.getlist("families")] or None,
            "promote_to": form.get("promote_to") or "staging",
        }
        if form.get("reproducible"):
            body["reproducible"] = True
        fields = (("metric", str), ("timeout_s", float), ("max_trials", int), ("seed", int), ("model_name", str))
        for field, cast in fields:
            raw = str(form.get(field) or "").strip()
            if raw:
                try:
                    body[field] = cast(raw)
                except ValueError:
                    raise ApiError(422, f"{field}: {raw!r} is not a number.") from None
        job = await page.api.post(f"/api/v1/projects/{quote(project, safe='')}/jobs", json=body)
        return _redirect(f"/ui/p/{quote(project, safe='')}/jobs/{job['id']}")

    return await _form_write(request, form, make)


def trial_chart(job: dict[str, Any]) -> Any:
    """Each finished trial's score against when it ended (seconds since the job started), by family."""
    started = job.get("started_at")
    trials = [t for t in job.get("leaderboard", []) if t.get("score") is not None and t.get("finished_at")]
    if not trials or not started:
        return ""
    from datetime import datetime

    t0 = datetime.fromisoformat(started).timestamp()
    series: dict[str, list[tuple[float, float]]] = {}
    for t in sorted(trials, key=lambda t: t["finished_at"]):
        at = datetime.fromisoformat(t["finished_at"]).timestamp() - t0
        series.setdefault(t["family"], []).append((max(at, 0.0), float(t["score"])))
    metric = str(job.get("spec", {}).get("metric", "score"))
    return charts.scatter(series, f"Trial {metric} over time by family", "seconds since start", metric)


@router.get("/p/{project}/jobs/{job_id}")
async def job(request: Request, project: str, job_id: int, fragment: bool = False) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/jobs/{job_id}"
        info = await page.api.get(base)
        logs = await page.api.get(f"{base}/logs")
        template = "job_live.html" if fragment else "job.html"
        return page.render(template, project=project, job=info, logs=logs, chart=trial_chart(info))

    return await _as_person(request, show)


@router.post("/p/{project}/jobs/{job_id}/cancel")
async def cancel_job(request: Request, project: str, job_id: int, csrf: Annotated[str, Form()] = "") -> Response:
    async def cancel(page: Page) -> Response:
        await page.api.post(f"/api/v1/projects/{quote(project, safe='')}/jobs/{job_id}/cancel")
        return _redirect(f"/ui/p/{quote(project, safe='')}/jobs/{job_id}")

    return await _as_person(request, cancel, write=True, csrf=csrf)


# --- models ----------------------------------------------------------------------------------


@router.get("/p/{project}/models/{model}")
async def model(
    request: Request,
    project: str,
    model: str,
    a: Annotated[str | None, Query(max_length=32)] = None,
    b: Annotated[str | None, Query(max_length=32)] = None,
    plots_of: Annotated[str | None, Query(alias="plots", max_length=32)] = None,
) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/models/{quote(model, safe='')}"
        info = await page.api.get(base)
        versions = await page.api.get(f"{base}/versions")
        comparison = await page.api.get(f"{base}/compare", a=a, b=b) if a and b else None
        shown = plots_of or (versions[-1]["version"] if versions else None)
        try:
            plot_names = await page.api.get(f"{base}/versions/{quote(str(shown), safe='')}/plots") if shown else []
        except ApiError as err:  # MLflow's artifacts out of reach: the rest of the page shows
            if err.status in (401, 403):
                raise
            plot_names = []
        metrics = sorted({m for v in versions for m in v.get("metrics", {}) if m.startswith("test_")})
        return page.render(
            "model.html",
            project=project,
            model=info,
            versions=versions,
            metrics=metrics,
            comparison=comparison,
            shown=shown,
            plot_names=plot_names,
            finite=lambda x: isinstance(x, int | float) and math.isfinite(x),
        )

    return await _as_person(request, show)


@router.get("/p/{project}/models/{model}/versions/{version}/plots/{plot}.png")
async def model_plot(request: Request, project: str, model: str, version: str, plot: str) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/models/{quote(model, safe='')}"
        png, kind = await page.api.content(f"{base}/versions/{quote(version, safe='')}/plots/{quote(plot, safe='')}")
        return Response(png, media_type=kind, headers={"Cache-Control": "private, max-age=300"} | _NOSNIFF)

    return await _as_person(request, show)


@router.post("/p/{project}/models/{model}/approval")
async def approval(request: Request, project: str, model: str) -> Response:
    """Ask for production approval of a version (engineer), or approve or reject it (admin)."""
    form = await request.form()

    async def decide(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/models/{quote(model, safe='')}"
        version = quote(str(form.get("version") or ""), safe="")
        body = {"action": form.get("action"), "note": str(form.get("note") or "").strip()}
        await page.api.post(f"{base}/versions/{version}/approval", json=body)
        return _redirect(f"/ui/p/{quote(project, safe='')}/models/{quote(model, safe='')}")

    return await _form_write(request, form, decide)


@router.post("/p/{project}/models/{model}/versions/{version}/promote")
async def promote(
    request: Request,
    project: str,
    model: str,
    version: str,
    stage: Annotated[str, Form(max_length=32)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    async def move(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/models/{quote(model, safe='')}"
        await page.api.post(f"{base}/versions/{quote(version, safe='')}/promote", json={"stage": stage})
        return _redirect(f"/ui/p/{quote(project, safe='')}/models/{quote(model, safe='')}")

    return await _as_person(request, move, write=True, csrf=csrf)


# --- deployments -----------------------------------------------------------------------------


def traffic_charts(traffic: dict[str, Any] | None) -> dict[str, Any]:
    """Three small line charts (x: minutes ago) from the traffic route's series."""
    if not traffic:
        return {}
    out = {}
    labels = {"requests_per_s": "requests/s", "errors_per_s": "errors/s", "p95_latency_ms": "p95 latency, ms"}
    for name, points in traffic.get("series", {}).items():
        if not points:
            continue
        end = max(p[0] for p in points)
        series = {labels.get(name, name): [((p[0] - end) / 60, p[1]) for p in points]}
        out[name] = charts.scatter(
            series,
            f"{labels.get(name, name)} over the last {traffic['minutes']} minutes",
            "minutes ago",
            labels.get(name, name),
            lines=True,
            x_range=(-float(traffic["minutes"]), 0.0),
            y_from_zero=True,
        )
    return out


@router.get("/p/{project}/deployments/{name}")
async def deployment(request: Request, project: str, name: str) -> Response:
    async def show(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/deployments/{quote(name, safe='')}"
        info = await page.api.get(base)
        parts: dict[str, Any] = {}
        problems: dict[str, str] = {}
        for part, path in (
            ("traffic", f"{base}/traffic"),
            ("history", f"{base}/history"),
            ("drift", f"{base}/drift"),
            ("quality", f"{base}/quality"),
            ("retrainings", f"{base}/retrainings"),
            ("monitoring", f"{base}/monitoring"),
            ("shadow", f"{base}/shadow"),
            ("datasets", f"/api/v1/projects/{quote(project, safe='')}/datasets"),
        ):
            try:  # Prometheus or MLflow away: the rest of the page still shows
                parts[part] = await page.api.get(path)
            except ApiError as err:
                if err.status in (401, 403, 404):
                    raise
                parts[part], problems[part] = None, err.detail
        model_base = f"/api/v1/projects/{quote(project, safe='')}/models/{quote(info['model_name'], safe='')}"
        try:
            versions = await page.api.get(f"{model_base}/versions")
        except ApiError as err:
            versions, problems["versions"] = [], err.detail
        return page.render(
            "deployment.html",
            project=project,
            dep=info,
            versions=versions,
            problems=problems,
            charts_=traffic_charts(parts.get("traffic")),
            **parts,
        )

    return await _as_person(request, show)


@router.post("/p/{project}/deployments")
async def create_deployment(request: Request, project: str) -> Response:
    form = await request.form()

    async def make(page: Page) -> Response:
        body = {
            "name": str(form.get("name") or "").strip(),
            "model_name": form.get("model_name"),
            "target": form.get("target"),
        }
        made = await page.api.post(f"/api/v1/projects/{quote(project, safe='')}/deployments", json=body)
        return _redirect(f"/ui/p/{quote(project, safe='')}/deployments/{quote(made['name'], safe='')}")

    return await _form_write(request, form, make)


def same_target(target: dict[str, Any]) -> dict[str, Any]:
    """An update body that keeps a deployment's target as it stands (and drops its shadow)."""
    if target.get("kind") == "split":
        return {"traffic": [{"version": int(s["version"]), "weight": int(s["weight"])} for s in target["split"]]}
    return {"target": target.get("version") or target.get("alias")}


@router.post("/p/{project}/deployments/{name}")
async def update_deployment(request: Request, project: str, name: str) -> Response:
    """Point the endpoint at a version or alias, or split its traffic between two versions."""
    form = await request.form()

    async def change(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/deployments/{quote(name, safe='')}"
        if form.get("action") == "rollback":
            await page.api.post(f"{base}/rollback")
        elif form.get("action") == "shadow":
            try:
                shadow = {"version": int(str(form.get("shadow_version"))), "fraction": float(str(form.get("fraction")))}
            except ValueError:
                raise ApiError(422, "The shadow's version is a whole number and its fraction a number.") from None
            await page.api.call("PATCH", base, json={"shadow": shadow})
        elif form.get("action") == "shadow_off":  # the same target again, with no shadow
            await page.api.call("PATCH", base, json=same_target((await page.api.get(base))["target"]))
        else:
            body: dict[str, Any] = {"allow_schema_change": form.get("allow_schema_change") == "on"}
            if form.get("split_version"):
                try:
                    weight = int(str(form.get("split_weight") or "10"))
                    body["traffic"] = [
                        {"version": int(str(form.get("main_version"))), "weight": 100 - weight},
                        {"version": int(str(form.get("split_version"))), "weight": weight},
                    ]
                except ValueError:
                    raise ApiError(422, "Versions and the weight are whole numbers.") from None
            else:
                body["target"] = form.get("target")
            await page.api.call("PATCH", base, json=body)
        return _redirect(f"/ui/p/{quote(project, safe='')}/deployments/{quote(name, safe='')}")

    return await _form_write(request, form, change)


@router.post("/p/{project}/deployments/{name}/batch")
async def batch(request: Request, project: str, name: str) -> Response:
    """Predict a whole dataset version through the deployment's model: a job like training's."""
    form = await request.form()

    async def start(page: Page) -> Response:
        base = f"/api/v1/projects/{quote(project, safe='')}/deployments/{quote(name, safe='')}"
        body = {"dataset": form.get("dataset"), "output_name": str(form.get("output_name") or "").strip() or None}
        job = await page.api.post(f"{base}/batch", json=body)
        return _redirect(f"/ui/p/{quote(project, safe='')}/jobs/{job['id']}")

    return await _form_write(request, form, start)


# --- admin -----------------------------------------------------------------------------------


@router.get("/admin/keys")
async def keys_page(request: Request) -> Response:
    async def show(page: Page) -> Response:
        return page.render("keys.html", keys=await page.api.get("/api/v1/keys"), made=None)

    return await _as_person(request, show)


@router.post("/admin/keys")
async def make_key(request: Request) -> Response:
    form = await request.form()

    async def make(page: Page) -> Response:
        body: dict[str, Any] = {
            "role": form.get("role"),
            "name": str(form.get("name") or "").strip(),
            "projects": [p.strip() for p in str(form.get("projects") or "").split(",") if p.strip()],
        }
        days = str(form.get("expires_in_days") or "").strip()
        if days:
            try:
                body["expires_in_days"] = float(days)
            except ValueError:
                raise ApiError(422, f"expires_in_days: {days!r} is not a number.") from None
        made = await page.api.post("/api/v1/keys", json=body)
        # The secret is shown on this answer only (never stored, never in a URL).
        return page.render("keys.html", status=201, keys=await page.api.get("/api/v1/keys"), made=made)

    return await _form_write(request, form, make)


@router.post("/admin/keys/{key_id}/projects")
async def grant_projects(
    request: Request,
    key_id: str,
    projects: Annotated[str, Form(max_length=20_000)] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    async def grant(page: Page) -> Response:
        names = [p.strip() for p in projects.split(",") if p.strip()]
        await page.api.call("PUT", f"/api/v1/keys/{quote(key_id, safe='')}/projects", json={"projects": names})
        return _redirect("/ui/admin/keys")

    return await _as_person(request, grant, write=True, csrf=csrf)


@router.post("/admin/keys/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str, csrf: Annotated[str, Form()] = "") -> Response:
    async def revoke(page: Page) -> Response:
        await page.api.call("DELETE", f"/api/v1/keys/{quote(key_id, safe='')}")
        return _redirect("/ui/admin/keys")

    return await _as_person(request, revoke, write=True, csrf=csrf)


@router.get("/admin/audit")
async def audit_page(
    request: Request,
    project: Annotated[str | None, Query(max_length=63)] = None,
    key_id: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
) -> Response:
    async def show(page: Page) -> Response:
        events = await page.api.get(
            "/api/v1/audit", project=project or None, key_id=key_id or None, since=since or None, limit=200
        )
        return page.render("audit.html", events=events, project=project or "", key_id=key_id or "", since=since or "")

    return await _as_person(request, show)
