"""The registered model as MLflow serves it: a ``PythonModel`` over the ONNX KV graph and the tokenizer.

This file is MLflow "model code" (``mlflow.pyfunc.save_model(python_model=<this file>)``): MLflow
copies it into the model folder and executes it when the model is loaded, so it must import only
what inference needs — mlflow, numpy, pandas and ``stages.formats.onnx.runtime`` (onnxruntime +
sentencepiece; no torch), which ``stages.serving.model_registry.save_pyfunc`` ships in the model's
``code/`` folder together with the ONNX graphs and tokenizer in ``artifacts/onnx``.

Why a module of its own instead of a class inside ``model_registry.py``: the class needs
``mlflow.pyfunc.PythonModel`` as a base when it is defined, and ``model_registry.py`` imports
mlflow only inside functions so that importing it stays light. Model code also avoids a pickled
object in the registry (MLflow's models-from-code). The boundary test (tests/test_boundary.py)
lists the few files of ``stages/`` allowed to import mlflow.

Input, one reply per request: a string; a list of strings; rows (a DataFrame, a list of dicts, or
one dict) each with a ``prompt`` string or a ``messages`` list of ``{"role", "content"}``; or the
same fields as columns (``{"prompt": [...]}``, how ``inputs``/``instances`` arrive over HTTP).
Anything else raises an ``MlflowException`` (HTTP 400 when served) naming what was given and what
is accepted, never an empty answer. Params ``max_new_tokens``, ``temperature`` (0 = greedy, as
``gptpipe generate``), ``top_k`` (0 = all) and ``seed``. Output: the reply text per request.
"""

from __future__ import annotations

import json
from typing import Any

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.pyfunc import PythonModel

ARTIFACT = "onnx"  # the export's files, under artifacts/onnx in the model folder
DEFAULT_PARAMS: dict[str, Any] = {"max_new_tokens": 64, "temperature": 0.0, "top_k": 0, "seed": -1}


FIELDS = ("prompt", "messages")
ACCEPTED = (
    "a string, a list of strings, or rows (a DataFrame or a list of dicts) with a 'prompt' string "
    "or a 'messages' list of {role: system|user|assistant, content}"
)
Request = str | list[dict[str, str]]  # a user prompt, or a conversation to continue


def _refuse(what: str) -> MlflowException:
    return MlflowException.invalid_parameter_value(f"gptpipe chat model: got {what}; it accepts {ACCEPTED}")


def _shown(value: Any) -> str:
    text = repr(value).replace("\n", " ")
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)  # NaN: a DataFrame's empty cell


def _plain(value: Any) -> Any:
    """A numpy 0-d array or scalar (how MLflow parses a JSON string or number) as a Python value."""
    return value.item() if getattr(value, "ndim", None) == 0 and hasattr(value, "item") else value


def _sequence(value: Any) -> list[Any] | None:
    """A list for a list, tuple, numpy array or pandas Series (how MLflow may hand a column over)."""
    if hasattr(value, "tolist") and not isinstance(value, str):
        value = value.tolist()
    return list(value) if isinstance(value, (list, tuple)) else None


def _conversation(value: Any) -> list[dict[str, str]] | None:
    """``value`` as a message list, if it is one (a JSON string of one too)."""
    from stages.lm.chat import ROLE_TOKENS

    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return None
    messages = _sequence(value)
    if not messages or not all(isinstance(m, dict) for m in messages):
        return None
    if not all(m.get("role") in ROLE_TOKENS and isinstance(m.get("content"), str) for m in messages):
        return None
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _request(row: dict[Any, Any]) -> Request:
    """One row's prompt or conversation (``messages`` wins when a row has both)."""
    unknown = [str(key) for key in row if key not in FIELDS]
    if unknown:
        raise _refuse(f"a row with unknown fields {unknown}")
    messages, prompt = _plain(row.get("messages")), _plain(row.get("prompt"))
    if not _absent(messages):
        conversation = _conversation(messages)
        if conversation is None:
            raise _refuse(f"'messages' {_shown(messages)}")
        return conversation
    if isinstance(prompt, str):
        return prompt
    raise _refuse("a row without a 'prompt' or 'messages'" if _absent(prompt) else f"'prompt' {_shown(prompt)}")


def _column_rows(columns: dict[Any, Any]) -> list[dict[Any, Any]]:
    """A dict is one row, or columns of rows when its values are lists (``{"prompt": ["a", "b"]}``)."""
    prompt, messages = _plain(columns.get("prompt")), _plain(columns.get("messages"))
    if isinstance(prompt, str) or _conversation(messages) is not None:
        return [columns]
    lists = {key: _sequence(value) for key, value in columns.items()}
    if any(value is None for value in lists.values()) or len({len(v) for v in lists.values()}) != 1:
        return [columns]  # not columns: _request names what is wrong with it as a row
    length = len(next(iter(lists.values())))
    return [{key: value[i] for key, value in lists.items()} for i in range(length)]


def requests(model_input: Any) -> list[Request]:
    """What a predict call asks for, one prompt or conversation per reply; ``MlflowException`` if
    ``model_input`` is none of the accepted shapes (``ACCEPTED``)."""
    model_input = _plain(model_input)
    if isinstance(model_input, str):
        return [model_input]
    if hasattr(model_input, "to_dict") and hasattr(model_input, "columns"):  # a DataFrame
        rows = model_input.to_dict(orient="records")
    elif isinstance(model_input, dict):
        rows = _column_rows(model_input)
    else:
        items = _sequence(model_input)
        if items is None:
            raise _refuse(_shown(model_input))
        rows = []
        for item in map(_plain, items):
            if isinstance(item, str):
                rows.append({"prompt": item})
            elif isinstance(item, dict):
                rows.append(item)
            else:
                raise _refuse(f"a list holding {_shown(item)}")
    if not rows:
        raise _refuse(f"no requests ({_shown(model_input)})")
    return [_request(row) for row in rows]


class GptpipeChatModel(PythonModel):
    """Chat replies from the runtime the export certified as fastest (``stages.formats.served``), generated
    exactly as ``gptpipe generate --onnx``."""

    def load_context(self, context) -> None:
        from stages.formats.served import open_served

        self.generator = open_served(context.artifacts[ARTIFACT])

    # No type hints on predict on purpose: MLflow 3 derives a schema from them, which would
    # replace the explicit signature the model is saved with.
    def predict(self, context, model_input, params=None):
        settings = {**DEFAULT_PARAMS, **(params or {})}
        seed = int(settings["seed"])
        return [
            self.generator.generate(
                request,
                max_new_tokens=int(settings["max_new_tokens"]),
                temperature=float(settings["temperature"]),
                top_k=int(settings["top_k"]) or None,
                seed=None if seed < 0 else seed + number,
            )
            for number, request in enumerate(requests(model_input))
        ]


mlflow.models.set_model(GptpipeChatModel())
