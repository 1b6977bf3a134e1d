"""The GPT as an ONNX graph that reads as its architecture: ONNX local functions, one per module.

Top level (what Netron shows first)::

    input_ids -> Embedding(wte) -> RotaryTables(rope) -> Block(blocks.0) ... Block(blocks.N-1)
              -> RMSNorm(norm_out) -> Linear(lm_head) -> logits

Each ``Block`` node is a call of the local function ``gptpipe.Block``; Netron draws it as one
node with a "show function" button that opens its body: ``RMSNorm(norm_attn) -> Attention(attn)
-> Add(residual) -> RMSNorm(norm_mlp) -> SwiGLU(mlp) -> Add(residual)``. ``Attention`` opens into
``Linear(qkv) -> Split -> SplitHeads -> RoPE -> DotProductAttention -> MergeHeads ->
Linear(proj)``. Node names follow ``stages.lm.model``'s module tree (``blocks.3`` at the top,
``attn`` inside a Block, ``qkv`` inside Attention); a function is one definition shared by its
call sites, so the full path of a node is its call site's name plus its own (``blocks.3.attn.qkv``).

Why built here rather than derived from an exporter: the dynamo exporter's graph keeps the
module path only as node metadata and its optimiser fuses across module boundaries, so
regrouping it into functions means re-deriving every function's inputs and outputs from a
flat, renamed graph; the TorchScript exporter's ``export_modules_as_functions`` cannot export
``aten::rms_norm`` at opset 17 and is deprecated. Writing the forward pass once more with
``onnx.helper`` from the model's own weights gives exact control of the names and nesting — and
it is not a diagram: the export stage runs it in ONNX Runtime through the same parity gate
(logits at every gate shape, greedy generations token for token) as ``model.onnx``, so a
drift between this file and ``stages.lm.model`` fails the export.

Functions take the weights as inputs (ONNX functions hold no initializers), so Netron shows on
each Block node which tensors it uses; the initializers keep the model's parameter names.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from stages.core.errors import ParityError
from stages.formats.layout import ARCHITECTURE_GRAPH
from stages.lm.model import GPT

DOMAIN = "gptpipe"

# Inputs of gptpipe.Block after (x, cos, sin), in order: the parameter names inside a Block.
BLOCK_WEIGHTS = (
    "norm_attn.weight",
    "attn.qkv.weight",
    "attn.proj.weight",
    "norm_mlp.weight",
    "mlp.w_gate.weight",
    "mlp.w_up.weight",
    "mlp.w_down.weight",
)


class _Body:
    """Nodes of one function body, with constants as Constant nodes (functions have no initializers)."""

    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name)))
        return name

    def op(
        self, op_type: str, inputs: list[str], outputs: list[str], name: str | None = None, domain: str = "", **attrs
    ) -> list[str]:
        self._count += 1
        node_name = name or f"{op_type.lower()}_{self._count}"
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain, **attrs))
        return outputs

    def call(self, function: str, inputs: list[str], outputs: list[str], name: str) -> list[str]:
        return self.op(function, inputs, outputs, name=name, domain=DOMAIN)

    def function(self, inputs: list[str], outputs: list[str], opset: int, doc: str) -> onnx.FunctionProto:
        imports = [helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)]
        return helper.make_function(DOMAIN, self.name, inputs, outputs, self.nodes, imports, doc_string=doc)


def _ints(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def linear(opset: int) -> onnx.FunctionProto:
    body = _Body("Linear")
    body.op("Transpose", ["weight"], ["weight_t"], name="transpose", perm=[1, 0])
    body.op("MatMul", ["x", "weight_t"], ["y"], name="matmul")
    return body.function(["x", "weight"], ["y"], opset, "nn.Linear without bias: y = x @ weight.T")


def embedding(opset: int) -> onnx.FunctionProto:
    body = _Body("Embedding")
    body.op("Gather", ["weight", "input_ids"], ["x"], name="lookup", axis=0)
    return body.function(["input_ids", "weight"], ["x"], opset, "token embedding: row input_ids of weight")


def rms_norm(opset: int, eps: float) -> onnx.FunctionProto:
    body = _Body("RMSNorm")
    body.op("Mul", ["x", "x"], ["square"], name="square")
    if opset >= 18:  # ReduceMean took its axes as an attribute before opset 18
        body.op("ReduceMean", ["square", body.const("axes", _ints(-1))], ["mean"], name="mean", keepdims=1)
    else:
        body.op("ReduceMean", ["square"], ["mean"], name="mean", axes=[-1], keepdims=1)
    body.op("Add", ["mean", body.const("eps", np.array(eps, dtype=np.float32))], ["shifted"], name="add_eps")
    body.op("Sqrt", ["shifted"], ["rms"], name="sqrt")
    body.op("Div", ["x", "rms"], ["normed"], name="normalize")
    body.op("Mul", ["normed", "weight"], ["y"], name="scale")
    return body.function(["x", "weight"], ["y"], opset, f"nn.RMSNorm: x / sqrt(mean(x^2) + {eps:g}) * weight")


def rotary_tables(opset: int) -> onnx.FunctionProto:
    body = _Body("RotaryTables")
    body.op("Shape", ["input_ids"], ["length"], name="length", start=1, end=2)
    zero, axis = body.const("zero", _ints(0)), body.const("axis", _ints(0))
    body.op("Slice", ["cos_table", zero, "length", axis], ["cos"], name="cos")
    body.op("Slice", ["sin_table", zero, "length", axis], ["sin"], name="sin")
    return body.function(
        ["input_ids", "cos_table", "sin_table"],
        ["cos", "sin"],
        opset,
        "RoPE cos/sin for positions 0..seq-1, cut from the precomputed block_size tables",
    )


def rope(opset: int, head_dim: int) -> onnx.FunctionProto:
    body = _Body("RoPE")
    half = head_dim // 2
    body.op("Split", ["x", body.const("halves", _ints(half, half))], ["x1", "x2"], name="halves", axis=-1)
    body.op("Mul", ["x1", "cos"], ["x1_cos"], name="x1_cos")
    body.op("Mul", ["x2", "sin"], ["x2_sin"], name="x2_sin")
    body.op("Mul", ["x1", "sin"], ["x1_sin"], name="x1_sin")
    body.op("Mul", ["x2", "cos"], ["x2_cos"], name="x2_cos")
    body.op("Sub", ["x1_cos", "x2_sin"], ["first"], name="rotate_first")
    body.op("Add", ["x1_sin", "x2_cos"], ["second"], name="rotate_second")
    body.op("Concat", ["first", "second"], ["y"], name="concat", axis=-1)
    return body.function(
        ["x", "cos", "sin"], ["y"], opset, "rotary position embedding of (batch, heads, seq, head_dim)"
    )


def split_heads(opset: int, n_head: int, head_dim: int) -> onnx.FunctionProto:
    body = _Body("SplitHeads")
    body.op("Reshape", ["x", body.const("shape", _ints(0, 0, n_head, head_dim))], ["heads"], name="reshape")
    body.op("Transpose", ["heads"], ["y"], name="transpose", perm=[0, 2, 1, 3])
    return body.function(["x"], ["y"], opset, "(batch, seq, width) -> (batch, heads, seq, head_dim)")


def merge_heads(opset: int, width: int) -> onnx.FunctionProto:
    body = _Body("MergeHeads")
    body.op("Transpose", ["x"], ["seq_first"], name="transpose", perm=[0, 2, 1, 3])
    body.op("Reshape", ["seq_first", body.const("shape", _ints(0, 0, width))], ["y"], name="reshape")
    return body.function(["x"], ["y"], opset, "(batch, heads, seq, head_dim) -> (batch, seq, width)")


def scaled_dot_product_attention(opset: int, head_dim: int) -> onnx.FunctionProto:
    body = _Body("DotProductAttention")
    body.op("Transpose", ["k"], ["k_t"], name="keys_t", perm=[0, 1, 3, 2])
    body.op("MatMul", ["q", "k_t"], ["raw"], name="scores")
    scale = body.const("scale", np.array(1.0 / math.sqrt(head_dim), dtype=np.float32))
    body.op("Mul", ["raw", scale], ["scores"], name="scale")
    body.op("Shape", ["q"], ["length"], name="length", start=2, end=3)
    body.op("Concat", ["length", "length"], ["square"], name="mask_shape", axis=0)
    body.op(
        "ConstantOfShape",
        ["square"],
        ["ones"],
        name="ones",
        value=helper.make_tensor("one", TensorProto.BOOL, [1], [True]),
    )
    body.op("Trilu", ["ones"], ["causal"], name="causal_mask", upper=0)
    minus_inf = body.const("minus_inf", np.array(-np.inf, dtype=np.float32))
    body.op("Where", ["causal", "scores", minus_inf], ["masked"], name="mask")
    body.op("Softmax", ["masked"], ["weights"], name="softmax", axis=-1)
    body.op("MatMul", ["weights", "v"], ["y"], name="weighted_values")
    return body.function(["q", "k", "v"], ["y"], opset, "causal softmax(q k^T / sqrt(head_dim)) v")


def attention(opset: int, width: int) -> onnx.FunctionProto:
    body = _Body("Attention")
    body.call("Linear", ["x", "qkv.weight"], ["qkv"], name="qkv")
    body.op(
        "Split",
        ["qkv", body.const("widths", _ints(width, width, width))],
        ["q_flat", "k_flat", "v_flat"],
        name="split_qkv",
        axis=2,
    )
    for part in ("q", "k", "v"):
        body.call("SplitHeads", [f"{part}_flat"], [f"{part}_heads"], name=f"heads_{part}")
    body.call("RoPE", ["q_heads", "cos", "sin"], ["q"], name="rope_q")
    body.call("RoPE", ["k_heads", "cos", "sin"], ["k"], name="rope_k")
    body.call("DotProductAttention", ["q", "k", "v_heads"], ["heads"], name="sdpa")
    body.call("MergeHeads", ["heads"], ["merged"], name="merge_heads")
    body.call("Linear", ["merged", "proj.weight"], ["y"], name="proj")
    return body.function(
        ["x", "cos", "sin", "qkv.weight", "proj.weight"],
        ["y"],
        opset,
        "causal multi-head self-attention with RoPE (stages.lm.model.Attention)",
    )


def swiglu(opset: int) -> onnx.FunctionProto:
    body = _Body("SwiGLU")
    body.call("Linear", ["x", "w_gate.weight"], ["gate"], name="w_gate")
    body.op("Sigmoid", ["gate"], ["gate_sigmoid"], name="sigmoid")
    body.op("Mul", ["gate", "gate_sigmoid"], ["gate_silu"], name="silu")
    body.call("Linear", ["x", "w_up.weight"], ["up"], name="w_up")
    body.op("Mul", ["gate_silu", "up"], ["hidden"], name="gate_times_up")
    body.call("Linear", ["hidden", "w_down.weight"], ["y"], name="w_down")
    return body.function(
        ["x", "w_gate.weight", "w_up.weight", "w_down.weight"],
        ["y"],
        opset,
        "SwiGLU MLP: w_down(silu(w_gate x) * w_up x) (stages.lm.model.SwiGLU)",
    )


def block(opset: int) -> onnx.FunctionProto:
    body = _Body("Block")
    norm_attn, qkv, proj, norm_mlp, gate, up, down = BLOCK_WEIGHTS
    body.call("RMSNorm", ["x", norm_attn], ["h_attn"], name="norm_attn")
    body.call("Attention", ["h_attn", "cos", "sin", qkv, proj], ["attended"], name="attn")
    body.op("Add", ["x", "attended"], ["x_attn"], name="residual_attn")
    body.call("RMSNorm", ["x_attn", norm_mlp], ["h_mlp"], name="norm_mlp")
    body.call("SwiGLU", ["h_mlp", gate, up, down], ["mlp_out"], name="mlp")
    body.op("Add", ["x_attn", "mlp_out"], ["y"], name="residual_mlp")
    return body.function(
        ["x", "cos", "sin", *BLOCK_WEIGHTS],
        ["y"],
        opset,
        "pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))",
    )


def _norm_eps(model: GPT) -> float:
    eps = model.norm_out.eps
    return float(torch.finfo(torch.float32).eps if eps is None else eps)


def build_architecture(model: GPT, opset: int) -> onnx.ModelProto:
    """The architecture-view ModelProto of ``model`` (fp32 weights as initializers)."""
    cfg = model.cfg
    state = {name: tensor.detach().float().cpu().numpy() for name, tensor in model.state_dict().items()}
    initializers = [
        numpy_helper.from_array(state["wte.weight"], "wte.weight"),
        numpy_helper.from_array(model.rope_cos.float().cpu().numpy(), "rope_cos"),
        numpy_helper.from_array(model.rope_sin.float().cpu().numpy(), "rope_sin"),
        numpy_helper.from_array(state["norm_out.weight"], "norm_out.weight"),
    ]
    top = _Body("main")
    top.call("Embedding", ["input_ids", "wte.weight"], ["embedded"], name="wte")
    top.call("RotaryTables", ["input_ids", "rope_cos", "rope_sin"], ["cos", "sin"], name="rope")
    x = "embedded"
    for i in range(cfg.n_layer):
        weights = [f"blocks.{i}.{name}" for name in BLOCK_WEIGHTS]
        initializers += [numpy_helper.from_array(state[name], name) for name in weights]
        top.call("Block", [x, "cos", "sin", *weights], [f"blocks.{i}.out"], name=f"blocks.{i}")
        x = f"blocks.{i}.out"
    top.call("RMSNorm", [x, "norm_out.weight"], ["normed"], name="norm_out")
    top.call("Linear", ["normed", "wte.weight"], ["logits"], name="lm_head")  # tied to the embedding
    functions = [
        embedding(opset),
        rotary_tables(opset),
        linear(opset),
        rms_norm(opset, _norm_eps(model)),
        rope(opset, cfg.head_dim),
        split_heads(opset, cfg.n_head, cfg.head_dim),
        merge_heads(opset, cfg.n_embd),
        scaled_dot_product_attention(opset, cfg.head_dim),
        attention(opset, cfg.n_embd),
        swiglu(opset),
        block(opset),
    ]
    graph = helper.make_graph(
        top.nodes,
        "gpt_architecture",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])],
        initializer=initializers,
    )
    proto = helper.make_model(
        graph,
        functions=functions,
        producer_name="gptpipe",
        opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(DOMAIN, 1)],
        doc_string=f"GPT {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd} wide; vocab {cfg.vocab_size}",
    )
    proto.ir_version = min(proto.ir_version, 10)  # the IR version this onnxruntime and Netron both read
    return proto


def block_count(proto: onnx.ModelProto) -> int:
    """Block calls at the graph's top level: what the view claims n_layer is."""
    return sum(1 for node in proto.graph.node if node.domain == DOMAIN and node.op_type == "Block")


def save_architecture(model: GPT, out: Path, opset: int, external: bool) -> str:
    """Write ``architecture.onnx`` (weights in ``architecture.onnx.data`` when ``external``); return its name."""
    proto = build_architecture(model, opset)
    if block_count(proto) != model.cfg.n_layer:  # the view must show the model it claims to be
        raise ParityError(f"{ARCHITECTURE_GRAPH}: {block_count(proto)} Block nodes for n_layer={model.cfg.n_layer}")
    onnx.save_model(
        proto,
        str(out / ARCHITECTURE_GRAPH),
        save_as_external_data=external,
        location=f"{ARCHITECTURE_GRAPH}.data" if external else None,
    )
    return ARCHITECTURE_GRAPH


def greedy_ids(session: Any, prompt_ids: list[int], max_new_tokens: int, block_size: int, stop_ids=()) -> list[int]:
    """Greedy new ids with the logits-only graph: every step recomputes the last ``block_size`` tokens.

    No cache, so the same ids as ``generate_ids`` (whose cached and uncached paths agree) when
    the graph computes the model's logits.
    """
    stops = {int(s) for s in stop_ids}
    context, new = [int(t) for t in prompt_ids], []
    for _ in range(max_new_tokens):
        logits = session.run(None, {"input_ids": np.array([context[-block_size:]], dtype=np.int64)})[0]
        token = int(np.argmax(logits[0, -1]))
        new.append(token)
        context.append(token)
        if token in stops:
            break
    return new
