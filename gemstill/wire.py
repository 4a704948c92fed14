"""What crosses between the processes of a run: plain values in a typed, versioned encoding, never Python objects.

The coordination service's key-value store has no authentication, so whatever reads a value from it must be
unable to run code by reading it. A value is JSON: None, booleans, integers, strings and finite floats as
themselves, and tagged objects for the rest: non-finite floats, lists, tuples, dicts (any of these keys), and
numpy arrays and scalars as their raw bytes with dtype and shape. Anything else is refused when it is sent.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Any

import numpy as np

VERSION = 1


class WireError(ValueError):
    """A value that cannot be sent, or bytes that are not a value this encoding wrote."""


def _encode(value: Any) -> Any:
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {"float": repr(value)}
    if isinstance(value, np.ndarray | np.generic):
        array = np.ascontiguousarray(value)
        data = base64.b64encode(array.tobytes()).decode("ascii")
        return {"array": {"dtype": array.dtype.name, "shape": list(array.shape), "data": data}}
    if isinstance(value, list):
        return {"list": [_encode(v) for v in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, dict):
        return {"dict": [[_encode(k), _encode(v)] for k, v in value.items()]}
    raise WireError(f"a {type(value).__name__} cannot cross between processes; send plain values or numpy arrays")


def _decode(node: Any) -> Any:
    if not isinstance(node, dict):
        if isinstance(node, list):
            raise WireError("a bare list in the encoding; it was not written by gemstill.wire")
        return node
    if len(node) != 1:
        raise WireError(f"an object with keys {sorted(node)} in the encoding; it was not written by gemstill.wire")
    ((tag, body),) = node.items()
    if tag == "float":
        if body not in ("nan", "inf", "-inf"):
            raise WireError(f"float {body!r} is not a non-finite float")
        return float(body)
    if tag == "list":
        return [_decode(v) for v in body]
    if tag == "tuple":
        return tuple(_decode(v) for v in body)
    if tag == "dict":
        return {_decode(k): _decode(v) for k, v in body}
    if tag == "array":
        dtype = np.dtype(_dtype(body["dtype"]))
        shape = tuple(int(n) for n in body["shape"])
        raw = base64.b64decode(body["data"], validate=True)
        if len(raw) != dtype.itemsize * math.prod(shape):
            raise WireError(f"an array of {shape} {dtype} holds {len(raw)} bytes")
        array = np.frombuffer(raw, dtype=dtype).reshape(shape).copy()
        return array[()] if shape == () else array
    raise WireError(f"unknown tag {tag!r} in the encoding")


def _dtype(name: str) -> Any:
    if name in ("bfloat16", "float8_e4m3fn", "float8_e5m2"):
        import ml_dtypes

        return getattr(ml_dtypes, name)
    dtype = np.dtype(name)
    if dtype.kind not in "biufc":  # numbers only: no objects, strings or records
        raise WireError(f"dtype {name!r} cannot cross between processes")
    return dtype


def dumps(value: Any) -> bytes:
    return json.dumps({"gemstill.wire": VERSION, "value": _encode(value)}, separators=(",", ":")).encode()


def loads(data: bytes) -> Any:
    try:
        document = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise WireError(f"not a gemstill.wire document ({err})") from None
    if not isinstance(document, dict) or document.get("gemstill.wire") != VERSION or "value" not in document:
        raise WireError(f"not a gemstill.wire version {VERSION} document")
    return _decode(document["value"])
