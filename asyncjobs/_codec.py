"""Strict JSON for job arguments and results.

Strict means a value either round-trips exactly or is refused: no NaN or
Infinity, no bytes, no tuples or sets turned into lists, no non-string keys
turned into strings. Refusals name the argument and the path inside it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from asyncjobs._errors import NotSerializable, PayloadTooLarge

JSON = Any
"""A JSON value: None, bool, int, float, str, list of JSON, dict of str to JSON."""

_encoder = json.JSONEncoder(
    ensure_ascii=True,  # lone surrogates survive as \\udxxx escapes
    allow_nan=False,
    separators=(",", ":"),
    check_circular=True,
)
_decode = json.JSONDecoder().decode


def _problem(value: Any, path: str, depth: int = 0) -> str | None:
    """Describe the first part of ``value`` that strict JSON refuses, or None."""
    if depth > 200:
        return f"{path or 'value'} is nested more than 200 levels deep"
    if value is None or type(value) in (bool, str, int):
        return None
    if type(value) is float:
        if value != value or value in (float("inf"), float("-inf")):
            return f"{path or 'value'} is {value!r}, which JSON cannot represent"
        return None
    if type(value) is list:
        for index, item in enumerate(value):
            found = _problem(item, f"{path}[{index}]", depth + 1)
            if found:
                return found
        return None
    if type(value) is dict:
        for key, item in value.items():
            if type(key) is not str:
                kind = type(key).__name__
                return f"{path or 'value'} has a key {key!r} of type {kind}; JSON keys must be str"
            found = _problem(item, f"{path}[{key!r}]", depth + 1)
            if found:
                return found
        return None
    kind = type(value).__name__
    hint = ""
    if isinstance(value, tuple | set | frozenset):
        hint = " (pass a list)"
    elif isinstance(value, bytes | bytearray):
        hint = " (decode or base64-encode it first)"
    return f"{path or 'value'} is of type {kind}, which is not JSON{hint}"


_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _surrogate_pair(value: Any) -> str | None:
    """Describe a string holding a surrogate pair (JSON reads it back as one character)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if type(item) is str and _PAIR.search(item):
            return f"the string {item!r} holds a surrogate pair, which JSON reads back as one"
        if type(item) is list:
            stack.extend(item)
        elif type(item) is dict:
            stack.extend(item)
            stack.extend(item.values())
    return None


def encode(value: JSON, *, what: str = "value") -> str:
    """Encode one value strictly; raise ``NotSerializable`` naming ``what``."""
    try:
        text = _encoder.encode(value)
        if _decode(text) == value and _problem(value, "") is None:
            return text
    except (TypeError, ValueError, RecursionError):
        pass
    reason = _problem(value, "") or _surrogate_pair(value) or "it does not round-trip through JSON"
    raise NotSerializable(f"{what} cannot be stored as JSON: {reason}")


_SCALARS = (str, int, bool, type(None))


def _is_strict(value: Any, depth: int = 0) -> bool:
    """Fast check that a value round-trips: only exact JSON types.

    True exactly when ``_problem(value, "")`` is None, without building the path text
    ``_problem`` needs for its message (this runs on every enqueue).
    """
    if depth > 200:
        return False
    kind = type(value)
    if kind in _SCALARS:
        return True
    if kind is float:
        return math.isfinite(value)
    if kind is list:
        return all(_is_strict(item, depth + 1) for item in value)
    if kind is dict:
        return all(type(key) is str and _is_strict(item, depth + 1) for key, item in value.items())
    return False


def encode_payload(
    args: Sequence[JSON],
    kwargs: Mapping[str, JSON],
    *,
    max_bytes: int,
    task: str,
) -> str:
    """Encode a job's arguments as ``{"args": [...], "kwargs": {...}}``.

    Raises ``NotSerializable`` naming the first bad argument, or ``PayloadTooLarge``.
    """
    payload = {"args": list(args), "kwargs": dict(kwargs)}
    try:
        text = _encoder.encode(payload)
        ok = _is_strict(payload)
        if ok and "\\ud" in text:
            # surrogate escapes: a pair of lone surrogates would read back as one character
            ok = _decode(text) == payload
    except (TypeError, ValueError, RecursionError):
        ok = False
    if not ok:
        for index, arg in enumerate(args):
            encode(arg, what=f"argument {index} of task {task!r}")
        for key, arg in kwargs.items():
            encode(arg, what=f"keyword argument {key!r} of task {task!r}")
            if _surrogate_pair(key):
                raise NotSerializable(
                    f"keyword argument name {key!r} of task {task!r} holds a surrogate pair, "
                    "which JSON reads back as one character"
                )
        raise NotSerializable(f"the arguments of task {task!r} cannot be stored as JSON")
    size = len(text)  # ensure_ascii: characters == bytes
    if size > max_bytes:
        raise PayloadTooLarge(
            f"the arguments of task {task!r} encode to {size} bytes, over the limit of "
            f"{max_bytes} bytes (max_payload_bytes); store large data elsewhere and pass a key"
        )
    return text


def decode_payload(text: str) -> tuple[list[JSON], dict[str, JSON]]:
    """Decode a stored payload; raise ``ValueError`` if it is not what we wrote."""
    data = _decode(text)
    if not isinstance(data, dict):
        raise ValueError("payload is not a JSON object")
    args = data.get("args", [])
    kwargs = data.get("kwargs", {})
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError("payload has no args list or kwargs object")
    return args, kwargs


def decode(text: str | None) -> JSON:
    return None if text is None else _decode(text)
