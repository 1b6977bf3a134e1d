"""onnxruntime-genai model folders: the builder, the gates (bit parity for fp32, quality for the quantized twin), generation."""
