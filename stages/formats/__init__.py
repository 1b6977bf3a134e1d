"""Export formats: each one a ``Format`` declared in its own module (``stages.formats.registry`` lists
them), with the library they share: file names (``layout``), parity comparisons, the certificate, the
runtimes that serve an export. Nothing here imports torch at import time but the writers and gates.
"""
