"""gtaseg: GTA-Seg (Gentle Teaching Assistant) semi-supervised semantic segmentation.

Importing gtaseg has no side effects. The library never imports prefect, dvc or boto3; mlflow is
imported only in `gtaseg.mlflow_tracking`.
"""

IGNORE_INDEX = 255  # label value that no loss or metric counts

__version__ = "0.1.0"
