from miniml.sdk.client import Client

__all__ = ["Client"]
