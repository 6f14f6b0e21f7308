"""deploy/compose.yml: valid for docker-compose, scalable, and in step with what the code reads."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from miniml.config import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "deploy" / "compose.yml"
VALUES = {
    "POSTGRES_PASSWORD": "pg-secret-1",
    "MINIO_ROOT_USER": "miniml",
    "MINIO_ROOT_PASSWORD": "minio-secret-1",
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret-1",
    "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-secret-1",
    "MLFLOW_FLASK_SECRET_KEY": "mlflow-flask-secret-1",
    "MODEL_SIGNING_KEY": "model-signing-key-0123456789abcdef-1",
}


def docker_compose() -> str:
    found = shutil.which("docker-compose")
    if found is None:
        pytest.skip("docker-compose is not installed (scripts/test installs Debian's docker-compose)")
    return found


def env_file(tmp_path: Path, **overrides: str) -> Path:
    lines = []
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0]
        value = overrides.get(key, VALUES.get(key))
        lines.append(line if value is None else f"{key}={value}")
    path = tmp_path / ".env"
    path.write_text("\n".join(lines) + "\n")
    return path


def config(tmp_path: Path, **overrides: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [docker_compose(), "-f", str(COMPOSE), "--env-file", str(env_file(tmp_path, **overrides)), "config"],
        capture_output=True,
        text=True,
        check=False,
    )


def test_example_env_holds_no_secret() -> None:
    for line in (ROOT / ".env.example").read_text().splitlines():
        key, _, value = line.partition("=")
        if "PASSWORD" in key or "SECRET" in key or key.endswith("_KEY") or key == "MINIO_ROOT_USER":
            assert value == "", f"{key} carries a value in .env.example"


def test_compose_config_passes_with_every_value(tmp_path: Path) -> None:
    result = config(tmp_path)
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert {
        "api",
        "worker",
        "inference",
        "mlflow",
        "prefect",
        "postgres",
        "minio",
        "createbuckets",
        "prometheus",
        "grafana",
    } <= set(services)


@pytest.mark.parametrize("missing", sorted(VALUES))
def test_a_missing_required_value_fails_with_its_name(tmp_path: Path, missing: str) -> None:
    result = config(tmp_path, **{missing: ""})
    assert result.returncode != 0
    assert f"set {missing} in .env" in result.stderr


def _setting_exists(var: str) -> bool:
    model: type[BaseModel] = Settings
    parts = var.removeprefix("MINIML_").lower().split("__")
    for i, part in enumerate(parts):
        field = model.model_fields.get(part)
        if field is None:
            return False
        ann = field.annotation
        if i < len(parts) - 1:
            if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
                return False
            model = ann
    return True


def test_services_match_what_the_code_reads(tmp_path: Path) -> None:
    services = yaml.safe_load(config(tmp_path).stdout)["services"]
    defaults = Settings()
    assert services["api"]["command"] == ["miniml", "api"]
    assert services["worker"]["command"] == ["miniml", "worker"]
    assert services["inference"]["command"] == ["miniml", "inference"]
    assert any(str(defaults.api.port) in str(p) for p in services["api"]["ports"])
    assert str(defaults.inference.port) in [str(p) for p in services["inference"]["expose"]]
    assert any(str(defaults.mlflow.port) in str(p) for p in services["mlflow"]["ports"])
    # Only what asks for credentials is published: not Prefect's UI, Prometheus or PostgreSQL.
    for name in ("prefect", "prometheus", "postgres"):
        assert "ports" not in services[name], f"{name} is published but has no sign-in"
    assert "basic-auth" in services["mlflow"]["command"]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == "/etc/mlflow/basic_auth.ini"
    assert (ROOT / "deploy" / "mlflow" / "basic_auth.ini").exists()
    signing = {n for n in services if "MINIML_AUTH__MODEL_SIGNING_KEY" in services[n].get("environment", {})}
    assert signing == {"worker", "inference"}
    for name in ("api", "worker", "inference"):
        env = services[name]["environment"]
        unknown = [k for k in env if k.startswith("MINIML_") and not _setting_exists(k)]
        assert unknown == [], f"{name} sets variables no setting reads: {unknown}"
        settings = Settings(**_nested(env))
        assert settings.mode == "production" and settings.storage.kind == "s3"
        assert settings.db_url.startswith("postgresql+psycopg://")
    assert services["api"]["environment"]["MINIML_MLFLOW__TRACKING_URI"].endswith(":5001")
    assert services["api"]["environment"]["MINIML_PREFECT__API_URL"] == "http://prefect:4200/api"


def test_workers_and_inference_can_scale(tmp_path: Path) -> None:
    services = yaml.safe_load(config(tmp_path).stdout)["services"]
    for name in ("worker", "inference"):
        assert "container_name" not in services[name]
        assert "ports" not in services[name], f"{name} binds a host port: --scale would collide"
    prometheus = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in prometheus["scrape_configs"]}
    assert jobs["miniml-inference"]["dns_sd_configs"][0]["names"] == ["inference"]
    worker = jobs["miniml-worker"]["dns_sd_configs"][0]
    assert worker["names"] == ["worker"] and str(worker["port"]) in [str(p) for p in services["worker"]["expose"]]
    assert Settings(**_nested(services["worker"]["environment"])).worker.metrics_port == worker["port"]
    assert services["prometheus"]["volumes"][0].endswith(":/etc/prometheus:ro")
    assert prometheus["rule_files"] == ["alerts.yml"] and (ROOT / "deploy" / "prometheus" / "alerts.yml").exists()


def _nested(env: dict[str, str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in env.items():
        if not key.startswith("MINIML_"):
            continue
        parts = key.removeprefix("MINIML_").lower().split("__")
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})  # type: ignore[assignment]
        node[parts[-1]] = value
    return out
