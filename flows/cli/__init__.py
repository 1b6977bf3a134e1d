"""The ``gptpipe`` command: run, generate, view, services, deploy (entry point ``flows.cli.main``)."""
