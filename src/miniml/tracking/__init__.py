"""The only package that talks to MLflow."""
