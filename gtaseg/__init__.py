"""gtaseg: GTA-Seg (Gentle Teaching Assistant) semi-supervised semantic segmentation.

Importing gtaseg has no side effects. The library never imports prefect, dvc or boto3; mlflow is
imported only in the MLflow adapter: `gtaseg.tracking.mlflow_tracker` and its two helpers,
`gtaseg.tracking.outbox` and `gtaseg.tracking.model_format`.
"""

IGNORE_INDEX = 255  # label value that no loss or metric counts

__version__ = "0.1.0"
