"""Serving a trained model through MLflow: the registered model version and the pyfunc chat model it runs.

Above ``core`` and ``lm``: the registry reads the export's files and serving runtime (``stages.lm``)
and ships code found from the import graph (``stages.storage``), which ``core`` may not import.
"""
