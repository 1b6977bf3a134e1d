"""The registered model as MLflow serves it: a ``PythonModel`` over the ONNX KV graph and the tokenizer.

This file is MLflow "model code" (``mlflow.pyfunc.save_model(python_model=<this file>)``): MLflow
copies it into the model folder and executes it when the model is loaded, so it must import only
what inference needs — mlflow, numpy, pandas and ``stages.lm.onnx_runtime`` (onnxruntime +
sentencepiece; no torch), which ``stages.core.tracking.save_pyfunc`` ships in the model's
``code/`` folder together with the ONNX graphs and tokenizer in ``artifacts/onnx``.

Why a second module for the tracking adapter instead of a class inside ``tracking.py``: the
class needs ``mlflow.pyfunc.PythonModel`` as a base when it is defined, and ``tracking.py``
imports mlflow only inside functions so that importing a stage stays light. Model code also
avoids a pickled object in the registry (MLflow's models-from-code). The boundary test
(tests/test_boundary.py) allows exactly these two files of ``stages/core`` to import mlflow.

Input: a DataFrame (or list of records) with a ``prompt`` string or a ``messages`` list of
``{"role", "content"}``; params ``max_new_tokens``, ``temperature`` (0 = greedy, as
``gptpipe generate``), ``top_k`` (0 = all) and ``seed``. Output: the reply text per row.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

ARTIFACT = "onnx"  # the export's files, under artifacts/onnx in the model folder
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "seed": -1}


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Records from whatever pyfunc hands over: a DataFrame, a dict of columns, records or strings."""
    if hasattr(model_input, "to_dict"):
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = [model_input]
    elif isinstance(model_input, str):
        rows = [{"prompt": model_input}]
    else:
        rows = [row if isinstance(row, dict) else {"prompt": str(row)} for row in model_input]
    # ``{"prompt": ["a", "b"]}`` reaches predict as ONE row holding a list (the signature's
    # optional array column makes MLflow keep the dict whole): it means one prompt per element.
    expanded = []
    for row in rows:
        prompts = row.get("prompt")
        if prompts is not None and not isinstance(prompts, str) and hasattr(prompts, "__len__"):
            expanded += [{"prompt": str(prompt)} for prompt in prompts]
        else:
            expanded.append(row)
    return expanded


def _conversation(row: dict[str, Any]) -> str | list[dict[str, str]]:
    messages = row.get("messages")
    if isinstance(messages, str):
        messages = json.loads(messages)
    if messages is not None and len(messages) > 0:
        return [{"role": str(m["role"]), "content": str(m["content"])} for m in messages]
    prompt = row.get("prompt")
    if prompt is None or (isinstance(prompt, float) and prompt != prompt):  # NaN: the column is absent here
        raise ValueError("each input row needs a 'prompt' string or a 'messages' list of {role, content}")
    return str(prompt)


class GptpipeChatModel(PythonModel):
    """Chat replies from the export's KV-cache graph, generated exactly as ``gptpipe generate --onnx``."""

    def load_context(self, context) -> None:
        from stages.lm.onnx_runtime import OnnxGenerator

        self.generator = OnnxGenerator(context.artifacts[ARTIFACT])

    # No type hints on predict on purpose: MLflow 3 derives a schema from them, which would
    # replace the explicit signature the model is saved with.
    def predict(self, context, model_input, params=None):
        settings = {**DEFAULT_PARAMS, **(params or {})}
        seed = int(settings["seed"])
        return [
            self.generator.generate(
                _conversation(row),
                max_new_tokens=int(settings["max_new_tokens"]),
                temperature=float(settings["temperature"]),
                top_k=int(settings["top_k"]) or None,
                seed=None if seed < 0 else seed + number,
            )
            for number, row in enumerate(_rows(model_input))
        ]


mlflow.models.set_model(GptpipeChatModel())
