"""Tracking: the tracker interface with its do-nothing default (`base`), and the MLflow adapter
(`mlflow_tracker`, with its `outbox` and `model_format`), the only modules that import mlflow."""
