"""Prefect flows and the code that submits them."""

FLOW_NAME = "miniml-train"
DEPLOYMENT_NAME = "miniml"
DEPLOYMENT = f"{FLOW_NAME}/{DEPLOYMENT_NAME}"
DRIFT_FLOW = "miniml-drift-check"
DRIFT_DEPLOYMENT = f"{DRIFT_FLOW}/{DEPLOYMENT_NAME}"
EVALUATE_FLOW = "miniml-evaluate"
EVALUATE_DEPLOYMENT = f"{EVALUATE_FLOW}/{DEPLOYMENT_NAME}"
