"""Metrics and drift."""
