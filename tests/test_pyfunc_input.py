"""What the registered pyfunc model makes of each input shape, before any generation.

``stages.serving.pyfunc.requests`` turns a predict input into one prompt or conversation per
reply: a string, a list of strings, ``prompt`` rows and ``messages`` rows (a DataFrame, a list of
dicts or one dict), including the numpy forms MLflow's HTTP parsing hands over. Anything else is
a one-line ``MlflowException`` naming what was given and what is accepted, never an empty answer.
tests/integration/test_model_serving.py runs the same shapes through a registered model and a
real ``mlflow models serve``.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from stages.serving.pyfunc import requests

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Reverse: a b c"}]


@pytest.mark.parametrize(
    "given, expected",
    [
        ("Last digit of 4827", ["Last digit of 4827"]),
        (["a", "b"], ["a", "b"]),
        (("a",), ["a"]),
        (np.array(["a", "b"]), ["a", "b"]),
        (np.array("a"), ["a"]),  # {"inputs": "a"} over HTTP
        (pd.Series(["a", "b"]), ["a", "b"]),
        ([{"prompt": "a"}, {"prompt": "b"}], ["a", "b"]),
        ([{"messages": CHAT}], [CHAT]),
        ([{"prompt": "a"}, {"messages": CHAT}], ["a", CHAT]),
        ({"prompt": "a"}, ["a"]),
        ({"messages": CHAT}, [CHAT]),
        ({"prompt": ["a", "b"]}, ["a", "b"]),  # {"inputs": {"prompt": [...]}}
        ({"prompt": np.array(["a", "b"])}, ["a", "b"]),  # {"instances": [{"prompt": ...}, ...]}
        ({"messages": [CHAT, CHAT[1:]]}, [CHAT, CHAT[1:]]),
        (pd.DataFrame({"prompt": ["a", "b"]}), ["a", "b"]),
        (pd.DataFrame({"messages": [CHAT]}), [CHAT]),
        (pd.DataFrame({"prompt": ["a", None], "messages": [None, CHAT]}), ["a", CHAT]),
        ([{"messages": '[{"role": "user", "content": "hi"}]'}], [[{"role": "user", "content": "hi"}]]),
    ],
)
def test_each_accepted_shape_gives_one_request_per_reply(given, expected):
    assert requests(given) == expected


@pytest.mark.parametrize(
    "given, named",
    [
        (5, "got int 5"),
        ([1, 2], "got a list holding int 1"),
        ([], "got no requests"),
        (pd.DataFrame({"prompt": []}), "got no requests"),
        (pd.DataFrame({"text": ["a"]}), "got a row with unknown fields ['text']"),
        ([{"question": "a"}], "got a row with unknown fields ['question']"),
        ([{"prompt": 3}], "got 'prompt' int 3"),
        (pd.DataFrame({"prompt": [None]}), "got a row without a 'prompt' or 'messages'"),
        ([{"messages": [{"role": "robot", "content": "a"}]}], "got 'messages' list"),
        ([{"messages": "not json"}], "got 'messages' str"),
        ([[{"role": "user", "content": "a"}]], "got a list holding list"),
    ],
)
def test_anything_else_is_a_one_line_error_naming_what_was_given(given, named):
    with pytest.raises(MlflowException) as caught:
        requests(given)
    message = caught.value.message
    assert named in message and "it accepts a string, a list of strings, or rows" in message
    assert "\n" not in message and caught.value.error_code == "INVALID_PARAMETER_VALUE"
