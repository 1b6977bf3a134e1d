#!/bin/sh
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d): the
# image already created POSTGRES_DB (Prefect's database); MLflow gets its own next to it.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" \
  -c "CREATE DATABASE \"${MLFLOW_DB_NAME:?MLFLOW_DB_NAME is not set}\""
