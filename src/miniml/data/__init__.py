"""Tabular files: format detection, streaming reads, profiles and validation rules (no web, no DB)."""
