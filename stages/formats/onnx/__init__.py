"""ONNX graphs: the exporter, their gates, the int8 copy, the architecture view and ONNX Runtime generation."""
