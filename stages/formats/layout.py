"""What an export artifact holds, by name: one place for the file names its writers and readers use.

The export stage declares these as its outputs; the graph writers, the parity gates, ONNX Runtime
generation, the served MLflow model and the Netron bundle open them through these constants.
This module imports nothing, so a torch-free serving container can use it.
"""

LOGITS_GRAPH = "model.onnx"  # logits for input ids; batch and sequence axes dynamic
KV_GRAPH = "model_kv.onnx"  # input ids + past keys/values -> logits + present keys/values
ARCHITECTURE_GRAPH = "architecture.onnx"  # the logits graph drawn as embedding -> Block x N -> head
PT2_FILE = "model.pt2"  # torch.export program of the logits model
INT8_FILE = "model.int8.onnx"  # dynamic int8 copy of the logits graph
META_FILE = "export.json"  # shapes, tensor names and graph files: what ONNX Runtime generation reads
TOKENIZER_DIR = "tokenizer"  # the tokenizer artifact's files, so the export runs on its own
HF_DIR = "hf"  # a Hugging Face LlamaForCausalLM checkpoint
GGUF_FILE = "model.gguf"  # the model and tokenizer as one GGUF file (f32) for llama.cpp and ollama
GENAI_DIR = "genai"  # an onnxruntime-genai model folder, built by its builder from hf/
GENAI_QUANTIZED_DIR = "genai-quantized"  # its weight-only quantized twin (kept when it passes its quality gate)
CERTIFICATE_FILE = "certificate.md"  # the equivalence certificate: one row per format
SVG_FILE = "architecture.svg"  # a static picture of the architecture for the report
EXTERNAL_DATA_SUFFIX = ".data"  # weights beside a graph over 2 GB: <graph>.data
