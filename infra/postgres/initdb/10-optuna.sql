-- Runs once, when the PostgreSQL volume is first initialised (POSTGRES_DB creates `mlflow`).
-- A second database for the Optuna storage of `memel tune`, owned by the same role.
CREATE DATABASE optuna;
