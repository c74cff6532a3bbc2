"""gtaseg: GTA-Seg (Gentle Teaching Assistant) semi-supervised semantic segmentation.

Importing gtaseg has no side effects. The library never imports prefect, dvc or boto3; mlflow is
imported only in the MLflow adapter: `gtaseg.mlflow_tracking` and its two helpers,
`gtaseg.mlflow_outbox` and `gtaseg.mlflow_models`.
"""

IGNORE_INDEX = 255  # label value that no loss or metric counts

__version__ = "0.1.0"
