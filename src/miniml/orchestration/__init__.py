"""Prefect flows and the code that submits them."""

FLOW_NAME = "miniml-train"
DEPLOYMENT_NAME = "miniml"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
