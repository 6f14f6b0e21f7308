from __future__ import annotations

import pytest
from pydantic import ValidationError

from miniml.config import Settings


@pytest.mark.parametrize("secret", ["changeme", "secret", "short-but-not-default"])
def test_production_refuses_weak_jwt_secret(secret: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIML_MODE", "production")
    monkeypatch.setenv("MINIML_AUTH__JWT_SECRET", secret)
    with pytest.raises(ValidationError, match="Refusing to start in production mode"):
        Settings()


def test_production_refuses_default_s3_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIML_MODE", "production")
    monkeypatch.setenv("MINIML_STORAGE__KIND", "s3")
    monkeypatch.setenv("MINIML_STORAGE__SECRET_ACCESS_KEY", "minioadmin")
    with pytest.raises(ValidationError, match="SECRET_ACCESS_KEY"):
        Settings()


def test_production_accepts_strong_or_generated_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIML_MODE", "production")
    assert Settings().auth.jwt_secret is None  # generated on first start, kept in the DB
    monkeypatch.setenv("MINIML_AUTH__JWT_SECRET", "x7" * 20)
    assert Settings().mode == "production"


def test_dev_mode_allows_anything_and_nested_env_works(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MINIML_AUTH__JWT_SECRET", "dev")
    monkeypatch.setenv("MINIML_API__PORT", "8123")
    settings = Settings()
    assert settings.api.port == 8123 and settings.api_url == "http://127.0.0.1:8123"


def test_every_setting_has_a_description() -> None:
    from pydantic import BaseModel

    def walk(model: type[BaseModel], prefix: str) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(prefix + name)
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                missing += walk(ann, f"{prefix}{name}.")
        return missing

    assert walk(Settings, "") == []


def test_settings_reference_is_up_to_date() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("settings_reference", root / "scripts" / "settings_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert (root / "docs" / "settings.md").read_text() == module.render(), "run scripts/settings_reference.py"
