-- One server, three databases: miniml's metadata (and Optuna's studies), MLflow's, Prefect's.
CREATE DATABASE mlflow OWNER miniml;
CREATE DATABASE prefect OWNER miniml;
