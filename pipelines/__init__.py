"""gtaseg pipelines: Prefect flows, DVC stage entry points, MLflow registry and S3 storage."""
