"""How a model is trained: the loop, checkpoints, batches, device/precision choices, distribution."""
