"""Request bodies the SDK checks before sending them."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from miniml.errors import InvalidInput

M = TypeVar("M", bound=BaseModel)


def request_body(model: type[M], data: dict[str, Any]) -> M:
    """``data`` checked here as the api would check it: a bad field raises InvalidInput naming it
    (as the api's 422 does), never pydantic's own error."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in exc.errors())
        raise InvalidInput(f"Invalid {model.__name__}: {problems}.") from None
