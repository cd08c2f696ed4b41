"""cnn-pipeline: ingest, train, evaluate and classify images with Prefect, MLflow and DuckDB."""

__version__ = "0.1.0"
