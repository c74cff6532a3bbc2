"""The MLflow registry: aliases and promotion, its lock, the promoted runs' models."""
