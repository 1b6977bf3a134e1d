"""The one convention for training targets: ``IGNORE`` marks a target the loss does not score.

Fine-tuning writes it for prompt tokens, role markers and padding (``lm.chat`` builds the masks),
the training loop and export's parity check skip it. It is torch's default ``ignore_index``.
A module of its own, free of torch, so the chat template (which must run without torch in the
ONNX demo) and the training loop share it without either importing the other.
"""

from __future__ import annotations

IGNORE = -100
