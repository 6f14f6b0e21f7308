"""The datasets contract, run against the local folder and against S3 (moto's server)."""

from __future__ import annotations

import csv
import hashlib
import io
import math
import os
import statistics
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fastapi.testclient import TestClient

from miniml.api.app import create_app
from miniml.api.routes import datasets as datasets_routes
from miniml.config import Settings
from miniml.data import formats
from tests.conftest import assert_problem

IRIS = Path(__file__).resolve().parents[2] / "data" / "samples" / "iris.csv"
URL = "/api/v1/projects/demo/datasets"


@pytest.fixture
def ds(store_settings: Settings) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    with TestClient(create_app(store_settings), raise_server_exceptions=False) as client:
        admin = {"X-API-Key": (store_settings.data_dir / "admin.key").read_text().strip()}
        assert client.post("/api/v1/projects", json={"name": "demo"}, headers=admin).status_code == 201
        yield client, admin, store_settings


def upload(client: TestClient, headers: dict[str, str], content: bytes, filename: str = "data.csv", **form: str):  # type: ignore[no-untyped-def]
    return client.post(URL, files={"file": (filename, content)}, data=form, headers=headers)


def stored_objects(client: TestClient) -> list[str]:
    return client.app.state.store.list_keys("projects/")  # type: ignore[attr-defined,no-any-return]


def assert_nothing_stored(client: TestClient, admin: dict[str, str], settings: Settings) -> None:
    assert stored_objects(client) == []
    assert client.get(URL, headers=admin).json() == []
    leftovers = list((settings.data_dir / "tmp").glob("*")) if (settings.data_dir / "tmp").exists() else []
    assert leftovers == []


def test_upload_profiles_and_versions(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, settings = ds
    raw = IRIS.read_bytes()
    first = upload(client, admin, raw, "iris.csv")
    assert first.status_code == 201, first.text
    body = first.json()
    assert (body["dataset"], body["version"], body["rows"]) == ("iris", 1, 150)
    assert body["sha256"] == hashlib.sha256(raw).hexdigest() and body["size_bytes"] == len(raw)
    scheme = "s3://" if settings.storage.kind == "s3" else "file://"
    assert body["uri"].startswith(scheme) and body["s3_uri"] == body["uri"]
    assert [c["name"] for c in body["columns"]] == [
        "sepal_length",
        "sepal_width",
        "petal_length",
        "petal_width",
        "target",
    ]
    kinds = {c["name"]: c["kind"] for c in body["columns"]}
    assert kinds["target"] == "categorical" and kinds["petal_length"] == "numeric"
    assert len(stored_objects(client)) == 1

    again = upload(client, admin, raw, "iris.csv")
    assert again.status_code == 200 and again.json()["version"] == 1
    assert len(stored_objects(client)) == 1

    changed = upload(client, admin, raw + b"5.0,3.0,1.5,0.2,Iris-setosa\n", "iris.csv")
    assert changed.status_code == 201 and changed.json()["version"] == 2 and changed.json()["rows"] == 151
    assert len(stored_objects(client)) == 2
    versions = client.get(f"{URL}/iris/versions", headers=admin).json()
    assert [v["version"] for v in versions] == [1, 2]
    assert client.get(f"{URL}/iris", headers=admin).json()["latest_version"] == 2


def test_profile_matches_the_data(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    body = upload(client, admin, IRIS.read_bytes(), "iris.csv").json()
    rows = list(csv.DictReader(IRIS.open()))
    cols = {c["name"]: c for c in body["profile"]["columns"]}
    values = [float(r["petal_length"]) for r in rows]
    pl = cols["petal_length"]
    assert pl["min"] == min(values) and pl["max"] == max(values)
    assert math.isclose(pl["mean"], statistics.fmean(values), rel_tol=1e-9)
    assert math.isclose(pl["std"], statistics.stdev(values), rel_tol=1e-9)
    assert pl["null_count"] == 0 and pl["distinct_count"] == len(set(values))
    hist = pl["histogram"]
    assert len(hist["edges"]) == len(hist["counts"]) + 1 and sum(hist["counts"]) == len(values)
    assert hist["edges"][0] == min(values) and hist["edges"][-1] == max(values)
    expected = Counter(r["target"] for r in rows)
    assert {t["value"]: t["count"] for t in cols["target"]["top"]} == dict(expected)


def test_download_is_byte_identical_and_preview_reads_rows(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    raw = IRIS.read_bytes()
    upload(client, admin, raw, "iris.csv")
    got = client.get(f"{URL}/iris/versions/1/file", headers=admin)
    assert got.status_code == 200 and got.content == raw
    preview = client.get(f"{URL}/iris/versions/1/preview?rows=3", headers=admin).json()
    first = next(csv.DictReader(IRIS.open()))
    assert len(preview["rows"]) == 3 and preview["rows"][0]["target"] == first["target"]
    assert preview["rows"][0]["sepal_length"] == float(first["sepal_length"])


@pytest.mark.parametrize("delimiter", [",", ";", "\t", "|"])
def test_delimiters_bom_and_quotes(ds: tuple[TestClient, dict[str, str], Settings], delimiter: str) -> None:
    client, admin, _ = ds
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter=delimiter, lineterminator="\n")
    writer.writerow(["city", "amount", "note"])
    writer.writerow(["Paris", "1.5", f"has {delimiter} inside"])
    writer.writerow(["Oslo", "2.5", 'says "hi"'])
    content = b"\xef\xbb\xbf" + buf.getvalue().encode()
    body = upload(client, admin, content, "cities.csv").json()
    assert [c["name"] for c in body["columns"]] == ["city", "amount", "note"]
    preview = client.get(f"{URL}/cities/versions/1/preview", headers=admin).json()
    assert preview["rows"][0]["note"] == f"has {delimiter} inside" and preview["rows"][1]["note"] == 'says "hi"'


def test_parquet_upload(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    sink = io.BytesIO()
    pq.write_table(pa.table({"x": [1.0, 2.0, None], "label": ["a", "b", "a"], "flag": [True, False, True]}), sink)
    body = upload(client, admin, sink.getvalue(), "table.parquet").json()
    assert body["format"] == "parquet" and body["rows"] == 3
    kinds = {c["name"]: c["kind"] for c in body["columns"]}
    assert kinds == {"x": "numeric", "label": "categorical", "flag": "boolean"}
    assert body["profile"]["columns"][0]["null_count"] == 1


def test_a_type_change_late_in_the_file_widens_the_column(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    lines = ["n,code"] + [f"{i},{i}" for i in range(300_000)] + ["1.5,abc"]
    body = upload(client, admin, ("\n".join(lines) + "\n").encode(), "wide.csv").json()
    kinds = {c["name"]: c for c in body["profile"]["columns"]}
    assert kinds["n"]["kind"] == "numeric" and kinds["n"]["max"] == 299_999
    assert kinds["code"]["arrow_type"] == "string"
    assert body["rows"] == 300_001


def test_a_ragged_row_deep_in_a_large_file_is_named_and_nothing_is_stored(
    ds: tuple[TestClient, dict[str, str], Settings],
) -> None:
    client, admin, settings = ds
    # Several parse blocks (1 MiB each) before the bad row: parsed on threads, the row still named.
    lines = ["a,b"] + [f"{i},{i * 7}" for i in range(400_000)] + ["1,2,3"] + ["4,5"] * 10
    response = upload(client, admin, ("\n".join(lines) + "\n").encode(), "deep.csv")
    assert_problem(response, 422, "row 400002", "3 fields", "header has 2")
    assert_nothing_stored(client, admin, settings)


def test_a_large_csv_is_stored_while_it_arrives_and_a_late_error_leaves_nothing(
    ds: tuple[TestClient, dict[str, str], Settings],
) -> None:
    """Over 16 MiB: on S3 the parts go up while the file is still being received and profiled."""
    client, admin, settings = ds
    good = ("x,y\n" + "".join(f"{i},{i % 97}.5\n" for i in range(1_600_000))).encode()
    assert len(good) > 16 << 20
    created = upload(client, admin, good, "large.csv")
    assert created.status_code == 201, created.text
    assert created.json()["rows"] == 1_600_000
    version_url = f"{URL}/large/versions/1"
    assert (
        hashlib.sha256(client.get(f"{version_url}/file", headers=admin).content).digest()
        == hashlib.sha256(good).digest()
    )
    kept = stored_objects(client)
    bad = good + b"1,2,3\n"
    assert_problem(upload(client, admin, bad, "large.csv"), 422, "row 1600002", "3 fields")
    assert stored_objects(client) == kept  # the refused file's parts are gone
    assert [v["version"] for v in client.get(f"{URL}/large/versions", headers=admin).json()] == [1]
    store = client.app.state.store  # type: ignore[attr-defined]
    if store.remote:
        assert store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", []) == []
    assert list((settings.data_dir / "tmp").glob("*")) == []


def test_quoted_fields_late_in_a_large_file_are_read_whole(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    """Quote-free pieces are parsed side by side; from the first quote on, the plain reader takes
    over mid-file. Values with the delimiter and a line end inside quotes stay one field, and a
    bad row after the switch is still named by its row in the file."""
    client, admin, _ = ds
    plain = [f"{i},{i % 7},city{i % 5}" for i in range(200_000)]  # about 3 MiB without a quote
    quoted = ['200000,3,"Lisbon, PT"', '200001,4,"two\nlines"', "200002,5,oslo"]
    body = ("id,n,city\n" + "\n".join(plain + quoted) + "\n").encode()
    read = upload(client, admin, body, "late.csv")
    assert read.status_code == 201, read.text
    profile = {c["name"]: c for c in read.json()["profile"]["columns"]}
    assert read.json()["rows"] == 200_003
    assert profile["id"]["max"] == 200_002 and profile["n"]["kind"] == "numeric"
    assert profile["city"]["distinct_count"] == 8  # city0..city4, "Lisbon, PT", "two\nlines", oslo
    preview_rows = client.get(f"{URL}/late/versions/1/preview?rows=3", headers=admin).json()["rows"]
    assert [r["id"] for r in preview_rows] == [0, 1, 2]
    bad = body + b"1,2\n"
    assert_problem(upload(client, admin, bad, "late2.csv"), 422, "row 200005", "2 fields", "header has 3")


def test_a_row_too_long_to_read_is_422_and_stores_nothing(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, settings = ds
    endless = b"n,text\n1," + b"z" * (17 << 20)  # one line with no end: never held whole
    assert_problem(upload(client, admin, endless, "endless.csv"), 422, "row is too long to read")
    assert_nothing_stored(client, admin, settings)


@pytest.mark.parametrize(
    ("content", "filename", "needles"),
    [
        (b"", "empty.csv", ["empty"]),
        (b"\xef\xbb\xbf", "bom.csv", ["empty"]),
        (b"a,b,c\n", "header.csv", ["no data rows"]),
        (b"a,b\n1,2\n3,4\n5,6,7\n", "ragged.csv", ["row 4", "3 fields", "header has 2"]),
        (b"a,b,a\n1,2,3\n", "dup.csv", ["'a'", "more than once"]),
        (b"a,,c\n1,2,3\n", "blank.csv", ["column 2", "empty name"]),
        (bytes(range(256)) * 40, "garbage.csv", ["not utf-8"]),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + b"\x00" * 100, "image.csv", ["nul bytes"]),
        (b"a,b\n1,2\n", "fake.parquet", ["parquet"]),
        (b"PAR1garbagegarbage", "broken.parquet", ["corrupt"]),
    ],
)
def test_malformed_files_are_422_and_store_nothing(
    ds: tuple[TestClient, dict[str, str], Settings], content: bytes, filename: str, needles: list[str]
) -> None:
    client, admin, settings = ds
    assert_problem(upload(client, admin, content, filename), 422, *needles)
    assert_nothing_stored(client, admin, settings)


@pytest.mark.parametrize("name", ["../x", "a/b", "a\\b", "x\x01y", "n" * 129, "..", " lead", "a b"])
def test_bad_dataset_names_are_422_and_store_nothing(
    ds: tuple[TestClient, dict[str, str], Settings], name: str
) -> None:
    client, admin, settings = ds
    assert_problem(upload(client, admin, IRIS.read_bytes(), "iris.csv", name=name), 422, "not valid")
    assert_nothing_stored(client, admin, settings)


@pytest.mark.parametrize("filename", ["../../etc/iris.csv", "C:\\x.csv", "..\\..\\iris.csv", "\\\\host\\share\\x.csv"])
def test_path_in_file_name_is_refused(ds: tuple[TestClient, dict[str, str], Settings], filename: str) -> None:
    """A path in the file name is refused whatever its platform's separators (no silent basename)."""
    client, admin, settings = ds
    assert_problem(upload(client, admin, IRIS.read_bytes(), filename), 422, "not valid")
    assert_nothing_stored(client, admin, settings)


@pytest.mark.parametrize(
    ("boundary", "body"),
    [
        ("b" * 70_000, b"--" + b"b" * 70_000 + b"\r\n"),
        ("x" * 71, b"--" + b"x" * 71 + b"\r\n"),
        ("ok", b"--ok\r\nContent-Disposition: form-data; name=file; filename=a.csv\r\n\r\na,b\r\n1,2\r\n--nope--"),
        ("ok", b"not a multipart body at all"),
    ],
    ids=["70KB-boundary", "71-char-boundary", "wrong-closing", "garbage"],
)
def test_malformed_multipart_is_400_and_leaves_nothing_on_disk(
    ds: tuple[TestClient, dict[str, str], Settings], boundary: str, body: bytes
) -> None:
    client, admin, settings = ds
    headers = {**admin, "content-type": f"multipart/form-data; boundary={boundary}"}
    response = client.post(URL, content=body, headers=headers)
    assert response.status_code in (400, 422), response.text
    assert_problem(response, response.status_code, "multipart" if response.status_code == 400 else "file")
    assert not list((settings.data_dir / "tmp").glob("upload-*")), "a temp file was left behind"
    assert_nothing_stored(client, admin, settings)


def test_not_multipart_or_no_file_is_422(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, settings = ds
    assert_problem(client.post(URL, json={"file": "x"}, headers=admin), 422, "multipart/form-data")
    assert_problem(
        client.post(URL, data={"name": "x"}, files={"other": ("a.csv", b"a\n1\n")}, headers=admin), 422, "no file"
    )
    assert_nothing_stored(client, admin, settings)


def test_oversized_upload_is_413_and_stores_nothing(store_settings: Settings) -> None:
    settings = store_settings.model_copy(
        update={"api": store_settings.api.model_copy(update={"max_upload_bytes": 4096})}
    )
    with TestClient(create_app(settings), raise_server_exceptions=False) as client:
        admin = {"X-API-Key": (settings.data_dir / "admin.key").read_text().strip()}
        client.post("/api/v1/projects", json={"name": "demo"}, headers=admin)
        big = b"a,b\n" + b"1,2\n" * 2000
        assert_problem(upload(client, admin, big, "big.csv"), 413, "upload limit")
        # Beyond the multipart slack the middleware cuts the body off before the route reads it.
        huge = b"a,b\n" + b"1,2\n" * 40_000
        assert_problem(upload(client, admin, huge, "huge.csv"), 413, "larger than")
        assert_nothing_stored(client, admin, settings)
        assert upload(client, admin, b"a,b\n1,2\n", "small.csv").status_code == 201


def test_roles_and_tenancy_for_datasets(
    ds: tuple[TestClient, dict[str, str], Settings],
) -> None:
    client, admin, settings = ds
    from miniml.domain.roles import Role
    from miniml.domain.tenancy import Caller
    from miniml.schemas.keys import KeyCreate
    from miniml.services import keys

    client.post("/api/v1/projects", json={"name": "other"}, headers=admin)
    with client.app.state.db.begin() as session:  # type: ignore[attr-defined]

        def key(role: str, project: str) -> dict[str, str]:
            _r, raw = keys.create_key(
                session, Caller("t", Role.admin, None), KeyCreate(role=Role(role), projects=[project])
            )
            return {"X-API-Key": raw}

        viewer, outsider = key("viewer", "demo"), key("engineer", "other")
    assert_problem(upload(client, viewer, IRIS.read_bytes(), "iris.csv"), 403, "engineer")
    assert_problem(upload(client, outsider, IRIS.read_bytes(), "iris.csv"), 404, "demo")
    assert_nothing_stored(client, admin, settings)
    upload(client, admin, IRIS.read_bytes(), "iris.csv")
    for path in (
        "",
        "/iris",
        "/iris/versions",
        "/iris/versions/1",
        "/iris/versions/1/file",
        "/iris/versions/1/preview",
    ):
        assert_problem(client.get(URL + path, headers=outsider), 404)
        assert client.get(URL + path, headers=viewer).status_code == 200
    assert client.get("/api/v1/projects/other/datasets", headers=outsider).json() == []


def test_delete_version_removes_row_and_object(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    upload(client, admin, IRIS.read_bytes(), "iris.csv")
    assert len(stored_objects(client)) == 1
    assert client.delete(f"{URL}/iris/versions/1", headers=admin).status_code == 204
    assert stored_objects(client) == []
    assert_problem(client.get(f"{URL}/iris/versions/1", headers=admin), 404, "no version 1")
    assert_problem(client.delete(f"{URL}/iris/versions/1", headers=admin), 404)


def test_validation_rules_report(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    content = b"id,score,label\n1,0.5,a\n2,,b\n2,7.5,z\n3,-1,a\n"
    upload(client, admin, content, "scores.csv")
    rules = {
        "id": {"unique": True, "dtype": "numeric"},
        "score": {"min": 0, "max": 5, "allow_nulls": False},
        "label": {"allowed_values": ["a", "b"], "dtype": "numeric"},
    }
    report = client.post(f"{URL}/scores/versions/1/validate", json={"rules": rules}, headers=admin).json()
    assert report["ok"] is False and report["rows"] == 4 and report["columns"] == 3
    found = {(i["column"], i["rule"]): (i["count"], i["example_rows"]) for i in report["issues"]}
    assert found == {
        ("id", "unique"): (1, [3]),
        ("score", "min"): (1, [4]),
        ("score", "max"): (1, [3]),
        ("score", "allow_nulls"): (1, [2]),
        ("label", "allowed_values"): (1, [3]),
        ("label", "dtype"): (1, []),
    }
    ok = client.post(
        f"{URL}/scores/versions/1/validate",
        json={"rules": {"label": {"allowed_values": ["a", "b", "z"]}}},
        headers=admin,
    )
    assert ok.json()["ok"] is True


@pytest.mark.parametrize(
    ("rules", "needle"),
    [
        ({"nope": {"min": 1}}, "unknown column"),
        ({"label": {"min": 1}}, "numeric column"),
        ({"score": {"between": [1, 2]}}, "between"),
        ({"score": {"dtype": "float128"}}, "dtype"),
    ],
)
def test_bad_validation_rules_are_422(
    ds: tuple[TestClient, dict[str, str], Settings], rules: dict[str, object], needle: str
) -> None:
    client, admin, _ = ds
    upload(client, admin, b"score,label\n1,a\n", "scores.csv")
    assert_problem(client.post(f"{URL}/scores/versions/1/validate", json={"rules": rules}, headers=admin), 422, needle)


def test_seed_upload_and_validate_by_uri(ds: tuple[TestClient, dict[str, str], Settings]) -> None:
    client, admin, _ = ds
    up = client.post("/datasets/upload?project=demo", files={"file": ("iris.csv", IRIS.read_bytes())}, headers=admin)
    assert up.status_code == 201
    uri = up.json()["s3_uri"]
    body = {"project": "demo", "dataset_s3_uri": uri, "rules": {"petal_width": {"max": 2.0}}}
    report = client.post("/datasets/validate", json=body, headers=admin).json()
    expected = sum(1 for r in csv.DictReader(IRIS.open()) if float(r["petal_width"]) > 2.0)
    assert report["issues"][0]["count"] == expected


@pytest.mark.parametrize(
    "uri_of",
    [
        lambda uri: "file:///etc/passwd",
        lambda uri: "http://169.254.169.254/latest/meta-data/",
        lambda uri: "s3://another-bucket/" + uri.split("/", 3)[-1],
        lambda uri: uri.rsplit("/", 1)[0] + "/../../../secret.csv",
        lambda uri: uri.replace("/projects/1/", "/projects/2/"),
    ],
)
def test_seed_validate_refuses_uris_outside_the_project(
    ds: tuple[TestClient, dict[str, str], Settings], uri_of: Callable[[str], str]
) -> None:
    client, admin, _ = ds
    uri = client.post(
        "/datasets/upload?project=demo", files={"file": ("iris.csv", IRIS.read_bytes())}, headers=admin
    ).json()["s3_uri"]
    body = {"project": "demo", "dataset_s3_uri": uri_of(uri), "rules": {}}
    assert_problem(client.post("/datasets/validate", json=body, headers=admin), 422, "not a dataset version of project")


def test_client_disconnect_mid_upload_leaves_nothing(store_settings: Settings) -> None:
    """20 MiB and then the client hangs up: on S3 two parts are already up, and must go."""
    import socket
    import threading
    import time

    import uvicorn

    from tests.conftest import free_port

    port = free_port()
    settings = store_settings.model_copy(update={"api": store_settings.api.model_copy(update={"port": port})})
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        key = (settings.data_dir / "admin.key").read_text().strip()
        import httpx

        assert (
            httpx.post(
                f"http://127.0.0.1:{port}/api/v1/projects", json={"name": "demo"}, headers={"X-API-Key": key}
            ).status_code
            == 201
        )
        boundary = "xyzBOUNDARY"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="cut.csv"\r\n'
            "Content-Type: text/csv\r\n\r\na,b\r\n"
        ).encode()
        total = 50 * 1024 * 1024
        request = (
            f"POST {URL} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {total}\r\n\r\n"
        ).encode()
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(request + head)
            for _ in range(320):
                sock.sendall(b"1,2\n" * 16384)  # 20 MiB in all, then hang up
        deadline = time.monotonic() + 10
        tmp_dir = settings.data_dir / "tmp"
        while time.monotonic() < deadline and tmp_dir.exists() and any(tmp_dir.iterdir()):
            time.sleep(0.1)
        assert not tmp_dir.exists() or list(tmp_dir.iterdir()) == []
        store = app.state.store
        assert store.list_keys("projects/") == []
        if store.remote:  # the abort may finish just after the temp file is gone
            in_progress = lambda: store.client.list_multipart_uploads(Bucket=store.bucket).get("Uploads", [])  # noqa: E731
            while time.monotonic() < deadline and in_progress():
                time.sleep(0.1)
            assert in_progress() == []
        listed = httpx.get(f"http://127.0.0.1:{port}{URL}", headers={"X-API-Key": key})
        assert listed.json() == []
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="thread priorities are Linux's")
def test_the_work_behind_an_upload_yields_the_cpu_to_request_handling(
    ds: tuple[TestClient, dict[str, str], Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Parsing and profiling run at background priority, the threads they start too; the thread
    that answers requests keeps its own, and so do the S3 parts (the transfer keeps pace)."""
    client, admin, _ = ds
    seen: dict[str, set[int]] = {"profile": set(), "parse": set(), "part": set()}

    def nice() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    def spy(what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[what].add(nice())
            return real(*args, **kwargs)

        return wrapper

    store = client.app.state.store  # type: ignore[attr-defined]
    monkeypatch.setattr(datasets_routes, "profile_table", spy("profile", datasets_routes.profile_table))
    monkeypatch.setattr(formats.pacsv, "read_csv", spy("parse", formats.pacsv.read_csv))
    if store.remote:
        monkeypatch.setattr(store, "_part", spy("part", store._part))
    before = nice()
    rows = "".join(f"{i},{i * 0.5},{'ab'[i % 2]}\n" for i in range(700_000))  # over 8 MiB: pieces and parts
    response = upload(client, admin, ("n,x,label\n" + rows).encode(), "big.csv")
    assert response.status_code == 201 and response.json()["rows"] == 700_000
    background = {before + datasets_routes.BACKGROUND_NICE}
    assert seen["profile"] == background and seen["parse"] == background
    assert seen["part"] == ({before} if store.remote else set())
    assert nice() == before  # this thread (and the event loop's) untouched


def test_a_full_disk_is_507_naming_where_and_keeps_nothing(tmp_path: Path) -> None:
    """A 1 MiB tmpfs over the upload folder: a 4 MiB upload is a 507 that says the disk is full."""
    import subprocess

    settings = Settings(data_dir=tmp_path / "data")
    tmp = settings.data_dir / "tmp"
    tmp.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(tmp)], capture_output=True, check=False
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {mounted.stderr.decode()[:200]}")
    try:
        with TestClient(create_app(settings), raise_server_exceptions=False) as client:
            admin = {"X-API-Key": (settings.data_dir / "admin.key").read_text().strip()}
            client.post("/api/v1/projects", json={"name": "demo"}, headers=admin)
            rows = IRIS.read_bytes().splitlines(keepends=True)
            big = rows[0] + b"".join(rows[1:] * 700)  # ~4 MiB
            assert len(big) > 3 << 20
            answer = upload(client, admin, big, "big.csv")
            assert_problem(answer, 507, "is full", "nothing of this upload was kept", str(tmp))
            assert list(tmp.iterdir()) == []
            assert client.get(URL, headers=admin).json() == []
            # Space again: the same upload goes through.
            small = upload(client, admin, IRIS.read_bytes(), "iris.csv")
            assert small.status_code == 201, small.text
    finally:
        subprocess.run(["umount", str(tmp)], check=False)


def test_parallel_uploads_to_one_new_name_each_make_a_version(tmp_path: Path, db_url: str) -> None:
    """20 uploads of different bytes to one new dataset name at once: 20 versions, no error (SQLite and PostgreSQL)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    from tests.conftest import LiveApi, free_port

    settings = Settings(data_dir=tmp_path / "data", api={"port": free_port()}, db={"url": db_url})
    rows = IRIS.read_bytes().splitlines(keepends=True)
    with LiveApi(settings) as api:
        httpx.post(f"{api.url}/api/v1/projects", json={"name": "demo"}, headers=api.headers).raise_for_status()

        def send(i: int) -> httpx.Response:
            body = b"".join(rows[: 20 + i])  # every file different
            return httpx.post(f"{api.url}{URL}", files={"file": ("race.csv", body)}, headers=api.headers, timeout=60)

        with ThreadPoolExecutor(20) as pool:
            answers = list(pool.map(send, range(20)))
        assert [a.status_code for a in answers] == [201] * 20, [a.text for a in answers if a.status_code != 201]
        assert sorted(a.json()["version"] for a in answers) == list(range(1, 21))
        listed = httpx.get(f"{api.url}{URL}/race/versions", headers=api.headers).json()
        assert len(listed) == 20
