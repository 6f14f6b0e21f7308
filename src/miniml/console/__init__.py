"""The web console at /ui: pages for people, built only on the api's public routes (like the SDK)."""

from miniml.console.pages import mount

__all__ = ["mount"]
