"""The console end to end in real headless Chromium (Debian's, driven by Playwright) against a live
`miniml up`: the seed flow done in the browser, each role's controls, a forged cookie, no other
origin, no JavaScript error. Screenshots of each page go to build/screenshots/console/."""

from __future__ import annotations

import os
import re
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port
from tests.test_up import _read_until, _start

pytestmark = pytest.mark.slow
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SHOTS = Path(__file__).resolve().parents[2] / "build" / "screenshots" / "console"
IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"

playwright_api = pytest.importorskip("playwright.sync_api")
if not os.path.exists(CHROMIUM):  # scripts/test installs Debian's chromium where it may
    pytest.skip("Debian's chromium is not installed (apt-get install chromium)", allow_module_level=True)


class Platform:
    def __init__(self, folder: Path, ports: dict[str, int]) -> None:
        self.folder, self.ports = folder, ports
        self.url = f"http://127.0.0.1:{ports['api']}"
        self.inference = f"http://127.0.0.1:{ports['inference']}"
        self.admin_key = (folder / "data" / "admin.key").read_text().strip()

    def key(self, role: str, *projects: str) -> str:
        made = httpx.post(
            f"{self.url}/api/v1/keys",
            json={"role": role, "projects": list(projects), "name": f"browser {role}"},
            headers={"X-API-Key": self.admin_key},
            timeout=30,
        )
        assert made.status_code == 201, made.text
        return str(made.json()["key"])


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    folder = tmp_path_factory.mktemp("up")
    ports = {name: free_port() for name in ("api", "mlflow", "prefect", "inference", "prometheus", "worker_metrics")}
    proc = _start(folder, ports)
    try:
        out = _read_until(proc, r"Press Ctrl-C", 300)
        assert f"{ports['api']}/ui" in out  # miniml up names the console's address
        yield Platform(folder, ports)
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(60)
        except Exception:
            os.killpg(proc.pid, signal.SIGKILL)


class Watched:
    """A browser page that records what a reviewer and the checks need: every request's origin,
    JavaScript errors, and a screenshot per page."""

    def __init__(self, page: Any, platform: Platform, role: str) -> None:
        self.page, self.platform, self.role = page, platform, role
        self.requests: list[str] = []
        self.errors: list[str] = []
        page.on("request", lambda r: self.requests.append(r.url))
        page.on("pageerror", lambda e: self.errors.append(str(e)))
        # A page's own status (a refusal shown as a page) is the test's to check; a failed asset is an error.
        page.on(
            "console",
            lambda m: self.errors.append(m.text) if m.type == "error" and "Failed to load" not in m.text else None,
        )
        page.on("response", self._response)
        page.set_default_timeout(30_000)

    def _response(self, response: Any) -> None:
        if response.status >= 400 and response.request.resource_type != "document":
            self.errors.append(f"{response.status} {response.url}")

    def goto(self, path: str) -> None:
        self.page.goto(self.platform.url + path)

    def shot(self, name: str) -> None:
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SHOTS / f"{self.role}-{name}.png"), full_page=True)

    def sign_in(self, key: str) -> None:
        self.goto("/ui/login")
        self.page.fill("#api_key", key)
        self.page.click("button[type=submit]")
        self.page.wait_for_url(re.compile(r".*/ui/projects$"))

    def check_clean(self) -> None:
        foreign = [u for u in self.requests if not u.startswith(self.platform.url) and not u.startswith("data:")]
        assert foreign == [], foreign
        assert self.errors == [], self.errors


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        yield chromium
        chromium.close()


def _page(browser: Any, platform: Platform, role: str) -> Watched:
    context = browser.new_context(viewport={"width": 1366, "height": 768})
    return Watched(context.new_page(), platform, role)


def _wait_text(page: Watched, selector: str, pattern: str, timeout_s: float, reload: bool = True) -> str:
    deadline = time.monotonic() + timeout_s
    while True:
        text = page.page.inner_text(selector)
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{selector} never matched {pattern!r}: {text[:500]}")
        time.sleep(1)
        if reload:
            page.page.reload()


def test_the_seed_flow_in_the_browser(browser: Any, platform: Platform) -> None:
    """An admin does the whole lifecycle in the console; a prediction made through the api shows up
    in the deployment's traffic."""
    admin = _page(browser, platform, "admin")
    admin.goto("/ui/projects")
    assert "/ui/login" in admin.page.url  # not signed in: the sign-in page
    admin.shot("login")
    admin.sign_in(platform.admin_key)
    admin.page.fill("#name", "web")
    admin.page.click("button:text-is('Create project')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web$"))
    admin.shot("project-empty")
    # Upload through the file input: the script sends it with a progress bar, then opens the dataset.
    admin.page.set_input_files("#file", str(IRIS))
    admin.page.click("#upload button[type=submit]")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/datasets/iris\?version=1$"))
    assert admin.page.locator("svg.chart").count() >= 5  # four histograms and the target's top values
    assert "150 rows, 5 columns" in admin.page.inner_text("main")
    admin.shot("dataset")
    admin.page.click("text=Train on iris")
    admin.page.select_option("#target", "target")
    for family in ("lightgbm", "hist_gradient_boosting", "xgboost", "random_forest", "torch_mlp"):
        admin.page.uncheck(f"input[name=families][value={family}]")
    admin.page.fill("#max_trials", "3")
    admin.shot("job-form")
    admin.page.click("button:text-is('Start training')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/jobs/\d+$"))
    admin.shot("job-running")
    # The page follows the job by itself (no reload here); it reloads once the job has ended.
    _wait_text(admin, "#job-state", "succeeded", 240, reload=False)
    assert admin.page.locator("svg.chart").count() == 1  # trial scores over time
    assert "Leaderboard" in admin.page.inner_text("main")
    admin.shot("job-done")
    admin.page.click("#live a[href='/ui/p/web/models/iris']")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/models/iris$"))
    admin.page.click("button[name=stage][value=production]")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/models/iris$"))
    assert "production" in admin.page.inner_text("main")
    plots = admin.page.locator("figure img")
    assert plots.count() >= 3  # confusion matrix, importances, the search's history: as the job logged them
    for i in range(plots.count()):
        assert plots.nth(i).evaluate("img => img.complete && img.naturalWidth > 100"), plots.nth(i).get_attribute("src")
    admin.shot("model")
    admin.page.fill("#dep-name", "web-iris")
    admin.page.select_option("#dep-target", "production")
    admin.page.click("button:text-is('Deploy')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/deployments/web-iris$"))
    _wait_text(admin, "main", r"\bready\b", 120)
    # Predictions through the api (not the console) appear in the deployment's traffic: its totals at
    # Prometheus's next scrape, its requests/s chart once a rate has two scrapes to go on.
    row = {"sepal_length": 5.1, "sepal_width": 3.5, "petal_length": 1.4, "petal_width": 0.2}
    deadline = time.monotonic() + 120
    while True:
        answer = httpx.post(
            f"{platform.inference}/v1/endpoints/web-iris/predict",
            json={"rows": [row]},
            headers={"X-API-Key": platform.admin_key},
            timeout=60,
        )
        assert answer.status_code == 200, answer.text
        admin.page.reload()
        totals = admin.page.locator("#traffic-totals")
        counted = totals.count() and re.match(r"[1-9][\d,]* requests", totals.inner_text())
        if counted and admin.page.locator("svg.chart").count() >= 1:  # requests/s over the last minutes
            break
        assert time.monotonic() < deadline, admin.page.inner_text("main")[:1500]
        time.sleep(2)
    admin.shot("deployment")
    # A shadow version, set and stopped in the page.
    admin.page.select_option("#shadow_version", "1")
    admin.page.fill("#fraction", "0.5")
    admin.page.click("button:text-is('Set shadow')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/deployments/web-iris$"))
    assert "Version 1 predicts on copies" in admin.page.inner_text("main")
    admin.page.click("button:text-is('Stop the shadow')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/deployments/web-iris$"))
    assert "No shadow version." in admin.page.inner_text("main")
    # A batch prediction of the whole dataset: a job whose output is a new dataset.
    admin.page.select_option("#batch-dataset", "iris")
    admin.page.fill("#output_name", "iris-scored")
    admin.page.click("button:text-is('Start batch prediction')")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/jobs/\d+$"))
    _wait_text(admin, "#job-state", "succeeded", 180, reload=False)
    admin.goto("/ui/p/web/datasets/iris-scored")
    assert "prediction" in admin.page.inner_text("main")
    admin.shot("batch-output")
    admin.goto("/ui/admin/audit")
    assert "deployment" in admin.page.inner_text("main")
    admin.shot("audit")
    admin.goto("/ui/admin/keys")
    admin.shot("keys")
    admin.check_clean()


def test_each_role_sees_only_its_controls(browser: Any, platform: Platform) -> None:
    """Run after the seed flow (same module): a viewer finds no write control anywhere, an engineer
    can upload and train but not deploy or promote to production, and neither reaches admin pages."""
    pages = ["/ui/projects", "/ui/p/web", "/ui/p/web/datasets/iris", "/ui/p/web/jobs/1", "/ui/p/web/models/iris"]
    pages.append("/ui/p/web/deployments/web-iris")
    viewer = _page(browser, platform, "viewer")
    viewer.sign_in(platform.key("viewer", "web"))
    for path in pages:
        viewer.goto(path)
        assert viewer.page.locator("h1").count() == 1, path
        writes = viewer.page.locator("form[method=post]:not([action='/ui/logout'])")
        assert writes.count() == 0, (path, writes.first.evaluate("f => f.outerHTML"))
        viewer.shot(path.strip("/").replace("/", "-"))
    viewer.goto("/ui/admin/keys")
    assert "admin" in viewer.page.inner_text("main").lower()  # the api's refusal, as it put it
    viewer.page.click("button:text-is('Sign out')")
    viewer.page.wait_for_url(re.compile(r".*/ui/login\?why=.*"))
    assert "Signed out." in viewer.page.inner_text("main")
    viewer.goto("/ui/projects")
    assert "/ui/login" in viewer.page.url  # the session is gone
    viewer.check_clean()

    engineer = _page(browser, platform, "engineer")
    # By keyboard alone: the key field has the focus, Enter signs in; on a page the first Tab reaches
    # the skip link.
    engineer.goto("/ui/login")
    assert engineer.page.evaluate("document.activeElement.id") == "api_key"
    engineer.page.keyboard.type(platform.key("engineer", "web"))
    engineer.page.keyboard.press("Enter")
    engineer.page.wait_for_url(re.compile(r".*/ui/projects$"))
    engineer.goto("/ui/p/web")
    engineer.page.keyboard.press("Tab")
    assert engineer.page.evaluate("document.activeElement.className") == "skip"
    assert engineer.page.locator("#upload").count() == 1 and engineer.page.locator("text=New training job").count() == 1
    # A file dropped on the upload area is uploaded (the same streaming upload, with its progress bar).
    engineer.page.evaluate(
        """() => {
        const data = new DataTransfer();
        data.items.add(new File(["a,b\\n1,x\\n2,y\\n3,x\\n"], "dropped.csv", {type: "text/csv"}));
        document.querySelector("#upload").dispatchEvent(new DragEvent("drop", {dataTransfer: data, bubbles: true}));
        }"""
    )
    engineer.page.wait_for_url(re.compile(r".*/ui/p/web/datasets/dropped\?version=1$"))
    assert "3 rows, 2 columns" in engineer.page.inner_text("main")
    engineer.goto("/ui/p/web/models/iris")
    assert engineer.page.locator("button[value=staging]").count() >= 1
    assert (
        engineer.page.locator("button[value=production]").count() == 0
        and engineer.page.locator("#dep-name").count() == 0
    )
    # An engineer asks for production approval with a note; an admin approves it in the console.
    engineer.page.select_option("#approval-version", "1")
    engineer.page.fill("#approval-note", "ready for production: f1 1.0 on held-out rows")
    engineer.page.click("button[value=request]")
    engineer.page.wait_for_url(re.compile(r".*/ui/p/web/models/iris$"))
    assert "pending" in engineer.page.inner_text("td.approval") and "ready for production" in engineer.page.inner_text(
        "td.approval"
    )
    assert engineer.page.locator("button[value=approve]").count() == 0
    engineer.shot("model")
    engineer.check_clean()

    admin = _page(browser, platform, "admin-approval")
    admin.sign_in(platform.admin_key)
    admin.goto("/ui/p/web/models/iris")
    admin.page.select_option("#approval-version", "1")
    admin.page.fill("#approval-note", "plots checked")
    admin.page.click("button[value=approve]")
    admin.page.wait_for_url(re.compile(r".*/ui/p/web/models/iris$"))
    assert "approved" in admin.page.inner_text("td.approval") and "plots checked" in admin.page.inner_text(
        "td.approval"
    )
    admin.shot("model-approved")
    admin.goto("/ui/admin/audit?project=web")
    assert "approve: plots checked" in admin.page.inner_text("main")
    admin.check_clean()


def test_a_forged_or_missing_session_gets_the_sign_in_page(browser: Any, platform: Platform) -> None:
    import jwt

    stranger = _page(browser, platform, "stranger")
    forged = jwt.encode(
        {"sub": "x", "role": "admin", "exp": int(time.time()) + 600}, "not-the-secret", algorithm="HS256"
    )
    for cookie in (forged, "garbage"):
        stranger.page.context.add_cookies([{"name": "miniml_session", "value": cookie, "url": platform.url + "/ui"}])
        stranger.goto("/ui/admin/keys")
        assert "/ui/login" in stranger.page.url and stranger.page.locator("#api_key").count() == 1
    stranger.page.fill("#api_key", "mml_wrong_key")
    stranger.page.click("button[type=submit]")
    assert stranger.page.locator(".error").count() == 1  # the api's detail, shown; still on sign-in
    stranger.shot("refused")
    stranger.check_clean()


def test_the_plots_route_names_what_a_version_has(platform: Platform) -> None:
    """Run after the seed flow: the api lists the job's plots, serves each as a PNG, and refuses an
    unknown or malformed name and another project's key."""
    base = f"{platform.url}/api/v1/projects/web/models/iris/versions/1/plots"
    admin = {"X-API-Key": platform.admin_key}
    names = httpx.get(base, headers=admin, timeout=30).json()
    assert "confusion_matrix" in names and "optimisation_history" in names
    png = httpx.get(f"{base}/confusion_matrix", headers=admin, timeout=30)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png" and png.content[:4] == b"\x89PNG"
    missing = httpx.get(f"{base}/residuals", headers=admin, timeout=30)
    assert missing.status_code == 404 and "confusion_matrix" in missing.json()["detail"]
    assert httpx.get(f"{base}/..%2F..%2Fmodel", headers=admin, timeout=30).status_code in (404, 422)
    made = httpx.post(f"{platform.url}/api/v1/projects", json={"name": "other-project"}, headers=admin, timeout=30)
    assert made.status_code == 201, made.text
    outsider = {"X-API-Key": platform.key("viewer", "other-project")}
    assert httpx.get(base, headers=outsider, timeout=30).status_code in (403, 404)
