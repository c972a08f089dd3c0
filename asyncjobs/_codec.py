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
_json_decode = json.JSONDecoder().decode


def _decode(text: str) -> Any:
    if type(text) is not str:  # a corrupt row: SQLite keeps a BLOB in any column
        raise ValueError(f"stored as {type(text).__name__}, not JSON text")
    try:
        return _json_decode(text)
    except RecursionError:  # a corrupt row: deeper than anything encode writes
        raise ValueError("nested too deeply to decode") from None


def _not_json(value: Any) -> Any:
    raise TypeError(f"{type(value).__name__} is not JSON")


# The C encoder behind ``_encoder``, made once: ``JSONEncoder.encode`` makes a new one
# per call, which costs more than encoding a typical payload. Same output; without the
# circular check a cycle ends in RecursionError, which callers treat as not JSON too.
_make_c_encoder: Any = getattr(json.encoder, "c_make_encoder", None)  # None: no _json
_c_encoder = (
    None
    if _make_c_encoder is None
    else _make_c_encoder(
        None, _not_json, json.encoder.encode_basestring_ascii, None, ":", ",", False, False, False
    )
)


def _dumps(value: Any) -> str:
    if _c_encoder is None:
        return _encoder.encode(value)
    return "".join(_c_encoder(value, 0))


_SCALARS = (str, int, bool, type(None))
_DEPTH_LIMIT = 200


def _problem(value: Any, depth: int = 0) -> str | None:
    """Describe the first part of ``value`` that strict JSON refuses, or None
    (``depth``: the levels ``value`` is nested in, counted towards the limit)."""
    found = _refused(value, depth)
    if found is None:
        return None
    steps, reason = found
    if reason == _TOO_DEEP:  # nested without end, maybe: a value that contains itself
        cycle = _cycle(value, [], {}, set())
        if cycle is not None:
            return cycle
    return ("".join(reversed(steps)) or "value") + reason


_TOO_DEEP = f" is nested more than {_DEPTH_LIMIT} levels deep"


def _cycle(value: Any, path: list[str], inside: dict[int, str], clear: set[int]) -> str | None:
    """Where ``value`` contains itself (a list or dict met again inside itself), or
    None. ``path``: the steps to ``value``; ``inside``: the containers around it, by
    id, with their paths; ``clear``: those already searched whole, found without one
    (each container is searched once: one shared by many others would otherwise be
    searched once per path to it). Only to word a refusal: not on the enqueue path."""
    kind = type(value)
    if (kind is not list and kind is not dict) or id(value) in clear:
        return None
    if len(path) > _DEPTH_LIMIT + 1:
        return None
    here = "".join(path) or "the value itself"
    if id(value) in inside:
        return f"{here} refers back to {inside[id(value)]} (a circular reference)"
    inside[id(value)] = here
    items = value.items() if kind is dict else enumerate(value)
    for key, item in items:
        path.append(f"[{key!r}]" if kind is dict else f"[{key}]")
        found = _cycle(item, path, inside, clear)
        path.pop()
        if found is not None:
            return found
    del inside[id(value)]
    clear.add(id(value))
    return None


def _refused(value: Any, depth: int) -> tuple[list[str], str] | None:
    """The path (innermost step first) to the first refused part, and why; or None.

    Runs on every enqueue, so the path text is only built for a refusal.
    """
    if depth > _DEPTH_LIMIT:
        return [], _TOO_DEEP
    kind = type(value)
    if kind in _SCALARS:
        return None
    if kind is float:
        return None if math.isfinite(value) else ([], f" is {value!r}, which JSON cannot represent")
    if kind is list:
        for index, item in enumerate(value):
            found = _refused(item, depth + 1)
            if found is not None:
                found[0].append(f"[{index}]")
                return found
        return None
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                key_kind = type(key).__name__
                return [], f" has a key {key!r} of type {key_kind}; JSON keys must be str"
            found = _refused(item, depth + 1)
            if found is not None:
                found[0].append(f"[{key!r}]")
                return found
        return None
    hint = ""
    if isinstance(value, tuple | set | frozenset):
        hint = " (pass a list)"
    elif isinstance(value, bytes | bytearray):
        hint = " (decode or base64-encode it first)"
    return [], f" is of type {kind.__name__}, which is not JSON{hint}"


_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")


def _unreadable(value: Any) -> tuple[list[str], str] | None:
    """The path (innermost step first) to the first part of ``value`` that JSON text
    cannot hold or reads back otherwise, and why; or None. For a value the walk
    (``_refused``) let through, so without cycles and at most ``_DEPTH_LIMIT`` deep:
    only to word a refusal, not on the enqueue path."""
    kind = type(value)
    if kind is int:
        try:
            repr(value)
        except ValueError:  # more digits than sys.get_int_max_str_digits() allows
            return [], f" is an int of {value.bit_length()} bits, too many digits for JSON text"
    elif kind is str and _PAIR.search(value):
        return [], f" is the str {value!r}, which holds a surrogate pair: JSON reads it back as one"
    elif kind is list:
        for index, item in enumerate(value):
            found = _unreadable(item)
            if found is not None:
                found[0].append(f"[{index}]")
                return found
    elif kind is dict:
        for key, item in value.items():
            if _PAIR.search(key):
                return [], f" has a key {key!r} holding a surrogate pair: JSON reads it back as one"
            found = _unreadable(item)
            if found is not None:
                found[0].append(f"[{key!r}]")
                return found
    return None


def _surrogate_pair(text: str) -> str | None:
    """Describe ``text`` if it holds a surrogate pair (JSON reads it back as one character)."""
    if _PAIR.search(text):
        return f"the string {text!r} holds a surrogate pair, which JSON reads back as one"
    return None


def encode(value: JSON, *, what: str = "value", depth: int = 0) -> str:
    """Encode one value strictly; raise ``NotSerializable`` naming ``what``
    (``depth``: the levels ``value`` will be nested in, counted towards the limit)."""
    failure = ""
    try:
        text = _dumps(value)
        # As in encode_payload: the walk refuses what JSON would change, and only a
        # surrogate escape needs the text read back (a pair of lone surrogates reads
        # back as one character). Reading back every value was nearly half of the time
        # a large result held the event loop (0.8 s of 1.6 s for a 42 MB result).
        if _refused(value, depth) is None and ("\\ud" not in text or _decode(text) == value):
            return text
    except (TypeError, ValueError, RecursionError) as error:
        failure = f" ({error})"  # e.g. an int longer than Python converts to text
    reason = _problem(value, depth)
    if reason is None and (found := _unreadable(value)) is not None:
        steps, why = found
        reason = ("".join(reversed(steps)) or "value") + why
    reason = reason or f"it does not round-trip through JSON{failure}"
    raise NotSerializable(f"{what} cannot be stored as JSON: {reason}")


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
        text = _dumps(payload)
        ok = _refused(payload, 0) is None
        if ok and "\\ud" in text:
            # surrogate escapes: a pair of lone surrogates would read back as one character
            ok = _decode(text) == payload
    except (TypeError, ValueError, RecursionError):
        ok = False
    if not ok:
        # Each argument sits two levels down: {"args": [...]} and {"kwargs": {...}}.
        for index, arg in enumerate(args):
            encode(arg, what=f"argument {index} of task {task!r}", depth=2)
        for key, arg in kwargs.items():
            encode(arg, what=f"keyword argument {key!r} of task {task!r}", depth=2)
            if _surrogate_pair(key):
                raise NotSerializable(
                    f"keyword argument name {key!r} of task {task!r} holds a surrogate pair, "
                    "which JSON reads back as one character"
                )
        raise NotSerializable(f"the arguments of task {task!r} cannot be stored as JSON")
    size = len(text)  # ensure_ascii: characters == bytes
    if size > max_bytes:
        sizes = {f"argument {index}": len(_dumps(arg)) for index, arg in enumerate(args)}
        sizes.update((f"keyword argument {key!r}", len(_dumps(arg))) for key, arg in kwargs.items())
        largest = max(sizes, key=sizes.__getitem__, default=None)
        which = "" if largest is None else f"; the largest is {largest} ({sizes[largest]} bytes)"
        raise PayloadTooLarge(
            f"the arguments of task {task!r} encode to {size} bytes, over the limit of "
            f"{max_bytes} bytes (max_payload_bytes){which}: store large data elsewhere "
            "and pass a key"
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


def visible(text: str, *, keep: str = "") -> str:
    """``text`` for a person to read (the dashboard, the CLI): each character that does
    not print (``str.isprintable``: a control, a format character such as a right-to-left
    override U+202E, which turns around what follows it, a zero-width space, a lone
    surrogate) written as its JSON escape, ``\\u202e``, but those in ``keep`` (the line
    breaks of indented JSON or of a traceback). Still JSON when ``text`` was, and the
    same value; printable text stays as it reads."""
    if text.isprintable():
        return text
    if keep and text.translate(dict.fromkeys(map(ord, keep))).isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else json.dumps(c)[1:-1] for c in text)


def decode(text: str | None) -> JSON:
    return None if text is None else _decode(text)
