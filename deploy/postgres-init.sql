-- One PostgreSQL, two databases: Prefect's and MLflow's. Runs once, on an empty volume.
CREATE DATABASE prefect;
CREATE DATABASE mlflow;
