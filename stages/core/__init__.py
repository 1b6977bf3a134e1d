"""What every stage shares: the typed recipe (config), the error types, the one MLflow adapter."""
