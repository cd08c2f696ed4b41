"""Plain PyTorch: models, the data pipeline, training, metrics and prediction.

Nothing here imports prefect, mlflow or duckdb, so it runs as well in a notebook.
"""
