"""The console's pages over HTTP, without a browser: sign-in and its cookie, CSRF, redirects, what
each role is offered, escaping, and the charts' logic."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.config import Settings
from miniml.console import charts
from tests.conftest import free_port

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[TestClient, str]]:
    folder = tmp_path_factory.mktemp("console")
    settings = Settings(data_dir=folder / "d", prefect={"port": free_port()}, mlflow={"port": free_port()})
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        yield client, (settings.data_dir / "admin.key").read_text().strip()


def sign_in(client: TestClient, key: str) -> str:
    client.cookies.clear()
    answer = client.post("/ui/login", data={"api_key": key, "next": "/ui/projects"}, follow_redirects=False)
    assert answer.status_code == 303, answer.text
    page = client.get("/ui/projects")
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1) if 'name="csrf"' in page.text else ""


def key_for(client: TestClient, admin: str, role: str, *projects: str) -> str:
    made = client.post("/api/v1/keys", json={"role": role, "projects": list(projects)}, headers={"X-API-Key": admin})
    assert made.status_code == 201, made.text
    return str(made.json()["key"])


def projects(client: TestClient, admin: str) -> list[str]:
    return [p["name"] for p in client.get("/api/v1/projects", headers={"X-API-Key": admin}).json()]


def test_sign_in_sets_an_httponly_strict_cookie_and_a_bad_key_sets_none(app: tuple[TestClient, str]) -> None:
    client, admin = app
    client.cookies.clear()
    refused = client.post(
        "/ui/login", data={"api_key": "mml_nope_nope", "next": "/ui/projects"}, follow_redirects=False
    )
    assert refused.status_code == 401 and "set-cookie" not in refused.headers
    assert 'class="error"' in refused.text and "key" in refused.text.lower()
    answer = client.post("/ui/login", data={"api_key": admin, "next": "/ui/projects"}, follow_redirects=False)
    cookie = answer.headers["set-cookie"]
    assert answer.status_code == 303 and answer.headers["location"] == "/ui/projects"
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/ui" in cookie and admin not in cookie
    page = client.get("/ui/projects")
    assert page.status_code == 200 and admin not in page.text  # the key itself is never in a page
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


@pytest.mark.parametrize("target", ["https://evil.example/", "//evil.example/ui/", "/ui\\..\\x", "/api/v1/keys"])
def test_sign_in_never_sends_you_to_another_site(app: tuple[TestClient, str], target: str) -> None:
    client, admin = app
    client.cookies.clear()
    answer = client.post("/ui/login", data={"api_key": admin, "next": target}, follow_redirects=False)
    assert answer.headers["location"] == "/ui/projects"


def test_a_write_without_this_sessions_csrf_token_is_refused_and_changes_nothing(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    before = projects(client, admin)
    for data, headers in (
        ({"name": "forged-a"}, {}),
        ({"name": "forged-b", "csrf": "0" * 40}, {}),
        ({"name": "forged-c", "csrf": csrf}, {"Origin": "https://evil.example"}),
    ):
        answer = client.post("/ui/projects", data=data, headers=headers, follow_redirects=False)
        assert answer.status_code == 403 and "another site" in answer.text, data
    upload = client.post(
        "/ui/p/none/datasets", files={"file": ("x.csv", b"a,b\n1,2\n")}, headers={"Accept": "application/json"}
    )
    assert upload.status_code == 403
    assert projects(client, admin) == before
    made = client.post("/ui/projects", data={"name": "real", "csrf": csrf}, follow_redirects=False)
    assert made.status_code == 303 and "real" in projects(client, admin)


def test_a_forged_expired_or_missing_session_goes_to_sign_in(app: tuple[TestClient, str]) -> None:
    client, admin = app
    secret = client.app.state.jwt_secret  # type: ignore[attr-defined]
    expired = jwt.encode({"sub": "x", "role": "admin", "exp": int(time.time()) - 10}, secret, algorithm="HS256")
    forged = jwt.encode({"sub": "x", "role": "admin", "exp": int(time.time()) + 600}, "guess", algorithm="HS256")
    for cookie in (None, "garbage", forged, expired):
        client.cookies.clear()
        if cookie:
            client.cookies.set("miniml_session", cookie, path="/ui")
        answer = client.get("/ui/admin/keys", follow_redirects=False)
        assert answer.status_code == 303 and answer.headers["location"].startswith(
            "/ui/login?next=%2Fui%2Fadmin%2Fkeys"
        )
        assert client.post("/ui/projects", data={"name": "nope"}, follow_redirects=False).status_code == 303
    assert "nope" not in projects(client, admin)


def test_a_viewer_is_offered_no_write_and_the_api_still_decides(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    client.post("/ui/projects", data={"name": "seen", "csrf": csrf})
    up = client.post(
        f"/ui/p/seen/datasets?csrf={csrf}",
        files={"file": ("iris.csv", IRIS.read_bytes())},
        headers={"Accept": "application/json"},
    )
    assert up.status_code == 200 and up.json()["location"] == "/ui/p/seen/datasets/iris?version=1"
    sign_in(client, key_for(client, admin, "viewer", "seen"))
    from miniml.console.session import csrf_for

    viewer_csrf = csrf_for(client.app.state.jwt_secret, client.cookies["miniml_session"])  # type: ignore[attr-defined]
    for path in ("/ui/projects", "/ui/p/seen", "/ui/p/seen/datasets/iris"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert re.findall(r'<form method="post" action="(?!/ui/logout)', page.text) == [], path
    # A hand-made write with a valid token of its own session: the api refuses the viewer.
    refused = client.post("/ui/projects", data={"name": "viewer-made", "csrf": viewer_csrf})
    assert refused.status_code == 403 and "admin" in refused.text.lower()
    assert client.get("/ui/admin/keys").status_code == 403
    assert "viewer-made" not in projects(client, admin)
    assert client.get("/ui/p/real").status_code == 404  # another project: the api does not say it exists


def test_what_a_dataset_holds_is_shown_escaped(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    client.post("/ui/projects", data={"name": "esc", "csrf": csrf})
    body = b'<b>col</b>,label\n1,"<script>alert(1)</script>"\n2,x\n3,x\n'
    up = client.post(
        f"/ui/p/esc/datasets?csrf={csrf}&name=tricky",
        files={"file": ("t.csv", body)},
        headers={"Accept": "application/json"},
    )
    assert up.status_code == 200, up.text
    page = client.get("/ui/p/esc/datasets/tricky").text
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "<b>col</b>" not in page


def test_a_refused_upload_answers_the_apis_problem_as_json(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    client.post("/ui/projects", data={"name": "bad-up", "csrf": csrf})
    answer = client.post(
        f"/ui/p/bad-up/datasets?csrf={csrf}", files={"file": ("x.csv", b"")}, headers={"Accept": "application/json"}
    )
    assert answer.status_code in (400, 422) and answer.json()["detail"]
    assert client.get("/api/v1/projects/bad-up/datasets", headers={"X-API-Key": admin}).json() == []


def test_the_charts_scale_to_their_data_and_escape_their_labels() -> None:
    svg = str(charts.histogram([0, 1, 2, 3], [1, 4, 2], "h"))
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([\d.]+)"', svg)]
    assert len(heights) == 3 and heights[1] == max(heights) and heights[0] == pytest.approx(heights[1] / 4)
    assert charts.histogram([0, 1], [1, 2], "mismatched") == ""
    bars = str(charts.bars([("<img src=x>", 2.0), ("b", 1.0)], "t"))
    assert "<img" not in bars and "&lt;img src=x&gt;" in bars
    widths = [float(w) for w in re.findall(r'<rect [^>]*width="([\d.]+)"', bars)]
    assert widths[0] == pytest.approx(2 * widths[1])
    plot = str(charts.scatter({"a": [(0, 1.0), (1, float("nan")), (2, 3.0)], "b": [(1, 2.0)]}, "s", "x", "y"))
    assert plot.count("<circle") == 3 + 2  # three finite points, two legend marks
    assert charts.scatter({"a": []}, "s", "x", "y") == ""


def test_every_console_route_but_sign_in_wants_a_session(app: tuple[TestClient, str]) -> None:
    """Read from the app: a console route added later is checked too."""
    from fastapi.routing import APIRoute

    client, _admin = app
    client.cookies.clear()
    open_paths = {"/ui", "/ui/", "/ui/login", "/ui/logout"}
    seen = 0
    for route in client.app.routes:  # type: ignore[attr-defined]
        router = getattr(route, "original_router", None)
        for r in router.routes if router is not None else [route]:
            if not isinstance(r, APIRoute) or not r.path.startswith("/ui") or r.path in open_paths:
                continue
            path = re.sub(r"\{[^}]+\}", "1", r.path)
            for method in r.methods:
                answer = client.request(method, path, follow_redirects=False)
                assert answer.status_code == 303, (method, path, answer.status_code)
                assert answer.headers["location"].startswith("/ui/login"), (method, path)
                seen += 1
    assert seen >= 20


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ({"kind": "alias", "alias": "production", "shadow": {"version": "2"}}, {"target": "production"}),
        ({"kind": "version", "version": "3"}, {"target": "3"}),
        (
            {"kind": "split", "split": [{"version": "1", "weight": 90}, {"version": "2", "weight": 10}]},
            {"traffic": [{"version": 1, "weight": 90}, {"version": 2, "weight": 10}]},
        ),
    ],
)
def test_stopping_a_shadow_sends_the_target_as_it_stands(target: dict[str, object], body: dict[str, object]) -> None:
    from miniml.console.pages import same_target

    assert same_target(target) == body


def test_rules_are_checked_on_the_dataset_page_and_bad_rules_named(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    client.post("/ui/projects", data={"name": "rules", "csrf": csrf})
    client.post(
        f"/ui/p/rules/datasets?csrf={csrf}",
        files={"file": ("iris.csv", IRIS.read_bytes())},
        headers={"Accept": "application/json"},
    )
    page = client.get("/ui/p/rules/datasets/iris")
    assert "sepal_length" in page.text and "&#34;min&#34;" in page.text  # rules to start from, from the profile
    holds = client.get("/ui/p/rules/datasets/iris", params={"rules": '{"sepal_length": {"min": 4, "max": 8}}'})
    assert "Every rule holds on all 150 rows" in holds.text
    broken = client.get("/ui/p/rules/datasets/iris", params={"rules": '{"sepal_length": {"max": 5}}'})
    assert "1 rule(s) broken" in broken.text and "<td>sepal_length</td><td>max</td>" in broken.text
    bad = client.get("/ui/p/rules/datasets/iris", params={"rules": "{not json"})
    assert bad.status_code == 200 and "not JSON" in bad.text
    unknown = client.get("/ui/p/rules/datasets/iris", params={"rules": '{"nope": {"min": 1}}'})
    assert 'role="alert"' in unknown.text and "nope" in unknown.text


def test_an_admin_changes_a_keys_projects_on_the_keys_page(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    for name in ("g-one", "g-two"):
        client.post("/ui/projects", data={"name": name, "csrf": csrf})
    made = client.post("/ui/admin/keys", data={"csrf": csrf, "role": "viewer", "projects": "g-one"})
    assert made.status_code == 201 and "shown this once" in made.text
    key_id = re.search(r"Key <strong>([^<]+)</strong>", made.text).group(1)
    saved = client.post(
        f"/ui/admin/keys/{key_id}/projects", data={"csrf": csrf, "projects": "g-one, g-two"}, follow_redirects=False
    )
    assert saved.status_code == 303
    listed = {k["id"]: k for k in client.get("/api/v1/keys", headers={"X-API-Key": admin}).json()}
    assert listed[key_id]["projects"] == ["g-one", "g-two"]
    refused = client.post(f"/ui/admin/keys/{key_id}/projects", data={"csrf": csrf, "projects": "g-one, nope"})
    assert refused.status_code == 422 and "nope" in refused.text
    forged = client.post(f"/ui/admin/keys/{key_id}/projects", data={"csrf": "x", "projects": "g-one"})
    assert forged.status_code == 403
    listed = {k["id"]: k for k in client.get("/api/v1/keys", headers={"X-API-Key": admin}).json()}
    assert listed[key_id]["projects"] == ["g-one", "g-two"]


def test_the_deployment_page_shows_drift_quality_shadow_and_retraining_as_the_api_gives_them() -> None:
    """Rendered from answers shaped as the api's (the browser test's deployment has none of these yet)."""
    from miniml.console.pages import templates

    report = {
        "id": 3,
        "trigger": "schedule",
        "state": "done",
        "finished_at": "2026-12-03T10:00:00",
        "rows": 500,
        "reference": {"dataset": "iris", "version": 1},
        "max_psi": 0.41,
        "prediction_psi": 0.1,
        "features": [
            {"feature": "petal<b>", "psi": 0.41, "ks": 0.3, "ks_p_value": 0.001, "drifted": True},
            {"feature": "sepal", "psi": 0.02, "ks": None, "ks_p_value": None, "drifted": False},
        ],
    }
    html = templates.get_template("deployment.html").render(
        me={"role": "viewer", "key_id": "k"},
        csrf="c",
        can=lambda role: role == "viewer",
        path="/",
        project="p",
        dep={
            "name": "d",
            "model_name": "m",
            "state": "ready",
            "desired": [{"version": "1", "weight": 100}],
            "endpoint": "http://x/v1/endpoints/d/predict",
            "error": None,
            "rollout_error": None,
            "previous_target": None,
            "target": {"kind": "alias", "alias": "production", "shadow": {"version": "2", "fraction": 0.1}},
        },
        versions=[],
        problems={},
        charts_={},
        traffic=None,
        history=[],
        drift={"latest": report, "history": [report]},
        monitoring={"retrain": {"drift_threshold": 0.3}},
        quality={"labelled": 40, "window_s": 3600, "accuracy": 0.9, "f1_macro": 0.88, "rmse": None, "mae": None},
        retrainings=[
            {
                "id": 1,
                "trigger": "drift",
                "state": "promoted",
                "champion_version": "1",
                "champion_score": 0.8,
                "challenger_version": "2",
                "challenger_score": 0.9,
                "promoted": True,
            }
        ],
        shadow={
            "shadow_version": "2",
            "requests": 10,
            "rows": 12,
            "agreement": 0.75,
            "mean_abs_difference": None,
            "live_latency_ms": 1.5,
            "shadow_latency_ms": 2.5,
        },
        datasets=[],
    )
    assert "largest PSI 0.41 (retraining threshold 0.3)" in html and "petal&lt;b&gt;" in html and "<b>" not in html
    assert "40 labelled predictions" in html and "accuracy 0.9" in html and "75.0 %" in html
    assert "Version 2 predicts on copies of 10 % of requests" in html
    assert "<td>promoted</td>" in html
    assert html.count('method="post"') == 1  # a viewer: sign-out is the only form


def test_when_the_api_cannot_say_who_you_are_the_page_says_why(
    app: tuple[TestClient, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from miniml.console import client as console_client

    client, admin = app
    sign_in(client, admin)
    real = console_client.Api.get

    async def busy(self: console_client.Api, path: str, **params: object) -> object:
        if path.endswith("/whoami"):
            raise console_client.ApiError(503, "The metadata DB is busy; retry in a moment.")
        return await real(self, path, **params)

    monkeypatch.setattr(console_client.Api, "get", busy)
    page = client.get("/ui/projects", follow_redirects=False)
    assert page.status_code == 503 and "metadata DB is busy" in page.text


def test_a_queued_job_is_started_and_cancelled_from_the_console(app: tuple[TestClient, str]) -> None:
    client, admin = app
    csrf = sign_in(client, admin)
    client.post("/ui/projects", data={"name": "jobs", "csrf": csrf})
    client.post(
        f"/ui/p/jobs/datasets?csrf={csrf}",
        files={"file": ("iris.csv", IRIS.read_bytes())},
        headers={"Accept": "application/json"},
    )
    form = client.get("/ui/p/jobs/jobs/new?dataset=iris").text
    assert '<option value="target" selected>' in form  # the last column is the default target
    bad = client.post(
        "/ui/p/jobs/jobs", data={"csrf": csrf, "dataset": "iris", "target": "target", "timeout_s": "soon"}
    )
    assert bad.status_code == 422 and "timeout_s" in bad.text
    bad_seed = client.post("/ui/p/jobs/jobs", data={"csrf": csrf, "dataset": "iris", "target": "target", "seed": "x"})
    assert bad_seed.status_code == 422 and "seed" in bad_seed.text
    made = client.post(
        "/ui/p/jobs/jobs",
        data={
            "csrf": csrf,
            "dataset": "iris",
            "target": "target",
            "families": ["linear"],
            "max_trials": "2",
            "seed": "7",
            "reproducible": "1",
        },
        follow_redirects=False,
    )
    assert made.status_code == 303 and re.fullmatch(r"/ui/p/jobs/jobs/\d+", made.headers["location"])
    job_id = made.headers["location"].rsplit("/", 1)[1]
    spec = client.get(f"/api/v1/projects/jobs/jobs/{job_id}", headers={"X-API-Key": admin}).json()["spec"]
    assert spec["seed"] == 7 and spec["reproducible"] is True
    job_page = client.get(made.headers["location"]).text
    assert "queued" in job_page and "Cancel job" in job_page
    cancelled = client.post(made.headers["location"] + "/cancel", data={"csrf": csrf}, follow_redirects=True)
    assert cancelled.status_code == 200 and 'id="job-state">cancelled<' in cancelled.text
    assert "Cancel job" not in cancelled.text


def test_two_versions_side_by_side_render_their_differences() -> None:
    from miniml.console.pages import templates

    def version(v: str, f1: float, family: str) -> dict[str, object]:
        return {
            "version": v,
            "aliases": [],
            "family": family,
            "metrics": {"test_f1_macro": f1},
            "job_id": 1,
            "dataset": "iris",
            "dataset_version": 1,
            "approval": None,
        }

    a, b = version("1", 0.9, "linear"), version("2", 0.95, "lightgbm")
    html = templates.get_template("model.html").render(
        me={"role": "viewer", "key_id": "k"},
        csrf="c",
        can=lambda role: role == "viewer",
        path="/",
        project="p",
        model={"name": "m", "registered_name": "p.m", "aliases": {}},
        versions=[a, b],
        metrics=["test_f1_macro"],
        comparison={"a": a, "b": b, "metric_differences": {"test_f1_macro": 0.05}},
        shown=None,
        plot_names=[],
        finite=lambda x: True,
    )
    assert "<td>test_f1_macro</td><td>0.9</td><td>0.95</td><td>+0.05</td>" in html
    assert "<td>family</td><td>linear</td><td>lightgbm</td>" in html
