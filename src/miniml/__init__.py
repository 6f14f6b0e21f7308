"""miniml: a small, honest ML platform."""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from miniml.sdk.client import Client

__all__ = ["Client"]


def __getattr__(name: str) -> Any:
    # Lazy, so `miniml api` does not import the SDK and the SDK does not import the server.
    if name == "Client":
        from miniml.sdk.client import Client

        return Client
    raise AttributeError(name)
