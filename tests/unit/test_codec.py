"""Strict JSON: a value round-trips exactly or is refused, naming where."""

from __future__ import annotations

import enum
import json
from collections import OrderedDict
from decimal import Decimal
from typing import Any

import pytest

from asyncjobs import NotSerializable, PayloadTooLarge, _codec
from asyncjobs._codec import decode, decode_payload, encode, encode_payload, visible


@pytest.fixture(autouse=True, params=["c-encoder", "python-encoder"])
def encoder(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test runs with the cached C encoder and with the fallback used by a Python
    without the _json accelerator: the two must agree."""
    if request.param == "python-encoder":
        monkeypatch.setattr(_codec, "_c_encoder", None)
    return str(request.param)


class Colour(enum.IntEnum):
    RED = 1


class Name(str):
    pass


@pytest.mark.parametrize(
    "value",
    [
        None,
        True,
        0,
        -(2**100),
        1.5,
        -0.0,
        "",
        "héllo \U0001f600",
        "\ud800",
        [],
        {},
        {"a": [1, {"b": None}], "": "empty key"},
        [[[[[["deep"]]]]]],
    ],
)
def test_json_values_round_trip_exactly(value: Any) -> None:
    text = encode(value)
    assert decode(text) == value
    assert type(decode(text)) is type(value)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        ([1, float("-inf")], r"\[1\] is -inf"),
        (b"raw", "bytes"),
        (bytearray(b"x"), "bytearray"),
        ((1, 2), "tuple.*pass a list"),
        ({1, 2}, "set"),
        ({1: "a"}, "key 1 of type int"),
        ({"k": {(1,): 2}}, "key"),
        (Colour.RED, "Colour"),
        (Name("x"), "Name"),
        (OrderedDict(a=1), "OrderedDict"),
        (Decimal("1.1"), "Decimal"),
        (object(), "object"),
    ],
)
def test_values_json_cannot_represent_exactly_are_refused(value: Any, reason: str) -> None:
    with pytest.raises(NotSerializable, match=reason):
        encode(value, what="the result")


def test_a_value_is_read_back_only_when_its_text_holds_a_surrogate_escape(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every value was decoded again to check its round trip, on top of the walk that
    refuses what JSON would change: nearly half of the time a large result held the
    event loop. Only a surrogate escape needs it: a pair of lone surrogates reads back
    as one character, and is refused."""
    decoded: list[str] = []
    real = _codec._decode

    def counting(text: str) -> Any:
        decoded.append(text)
        return real(text)

    monkeypatch.setattr(_codec, "_decode", counting)
    assert encode({"a": [1, "é", None]}) == '{"a":[1,"\\u00e9",null]}'
    assert decoded == []
    assert encode("\U0001f600") == '"\\ud83d\\ude00"'
    assert len(decoded) == 1
    with pytest.raises(NotSerializable, match="surrogate pair"):
        encode("\ud83d\ude00", what="the result")


def test_circular_values_are_refused() -> None:
    loop: list[Any] = []
    loop.append(loop)
    with pytest.raises(NotSerializable):
        encode(loop)
    with pytest.raises(NotSerializable, match="argument 0 of task 't'"):
        encode_payload([loop], {}, max_bytes=1000, task="t")


def test_both_encoders_write_the_same_text(encoder: str) -> None:
    value = {"s": 'é \U0001f600 \ud800 "q" \\', "n": [-(2**70), 1.5, -0.0, None, True], "e": {}}
    assert encode(value) == json.dumps(
        value, ensure_ascii=True, allow_nan=False, separators=(",", ":")
    )


def test_too_deep_nesting_is_refused() -> None:
    value: Any = "leaf"
    for _ in range(300):
        value = [value]
    with pytest.raises(NotSerializable, match="nested more than 200"):
        encode(value)
    with pytest.raises(NotSerializable, match=r"argument 0 of task 't'.* nested more than 200"):
        encode_payload([value], {}, max_bytes=10_000, task="t")


def test_a_value_that_contains_itself_is_refused_as_circular_not_as_too_deep() -> None:
    loop: list[Any] = [1]
    loop.append(loop)
    with pytest.raises(NotSerializable, match=r": \[1\] refers back to the value itself \(a circ"):
        encode(loop)
    inner: dict[str, Any] = {}
    inner["c"] = [inner]
    with pytest.raises(
        NotSerializable, match=r"'to' of task 't'.*\['a'\]\['c'\]\[0\] refers back to \['a'\] "
    ):
        encode_payload([], {"to": {"a": inner}}, max_bytes=1000, task="t")
    shared = [1, 2]  # met twice, but never inside itself: stored
    assert json.loads(encode({"x": shared, "y": [shared]})) == {"x": [1, 2], "y": [[1, 2]]}


@pytest.mark.parametrize("depth", [198, 199, 200])
def test_an_argument_too_deep_for_the_payload_is_refused_by_name(depth: int) -> None:
    value: Any = "leaf"
    for _ in range(depth):
        value = [value]
    encode(value)  # alone, up to 200 levels
    if depth <= 198:  # the payload's {"args": [...]} adds two
        encode_payload([value], {"k": value}, max_bytes=100_000, task="t")
    else:
        with pytest.raises(NotSerializable, match=r"keyword argument 'k' of task 't'.* 200 lev"):
            encode_payload([], {"k": value}, max_bytes=100_000, task="t")


def test_encode_payload_names_the_bad_argument() -> None:
    with pytest.raises(NotSerializable, match=r"argument 1 of task 'send'.*bytes"):
        encode_payload([1, b"x"], {}, max_bytes=1000, task="send")
    with pytest.raises(NotSerializable, match=r"keyword argument 'to' of task 'send'.*\['a'\]"):
        encode_payload([], {"to": {"a": float("nan")}}, max_bytes=1000, task="send")


def test_an_int_too_long_or_a_surrogate_pair_deep_inside_is_refused_by_its_path() -> None:
    """Like every other refusal, these two name where the value is inside the argument
    (they were found only by the round trip, and named the argument alone)."""
    huge = 10**5000  # more digits than Python converts to text
    with pytest.raises(NotSerializable, match=r"'user' of task 't'.*: \['tags'\]\[2\] is an int"):
        encode_payload([], {"user": {"tags": [1, 2, huge]}}, max_bytes=100_000, task="t")
    with pytest.raises(NotSerializable, match=r"argument 0 of task 't'.*: \[1\]\['a'\] is the str"):
        encode_payload([[0, {"a": "\U0001f600 \ud83d\ude00"}]], {}, max_bytes=1000, task="t")
    with pytest.raises(NotSerializable, match=r"the result .*: \[0\] has a key '.*' holding"):
        encode([{"\ud83d\ude00": 1}], what="the result")


def test_payload_limit_counts_encoded_bytes() -> None:
    text = encode_payload(["é"], {}, max_bytes=1000, task="t")
    limit = len(text.encode())
    assert encode_payload(["é"], {}, max_bytes=limit, task="t") == text
    with pytest.raises(PayloadTooLarge, match=f"{limit} bytes, over the limit of {limit - 1}"):
        encode_payload(["é"], {}, max_bytes=limit - 1, task="t")


def test_payload_over_the_limit_names_its_largest_argument() -> None:
    with pytest.raises(PayloadTooLarge, match=r"largest is keyword argument 'body' \(1002 bytes\)"):
        encode_payload(["x" * 500], {"to": "a", "body": "y" * 1000}, max_bytes=1000, task="t")
    with pytest.raises(PayloadTooLarge, match=r"largest is argument 1 \(602 bytes\)"):
        encode_payload(["x" * 500, "z" * 600], {}, max_bytes=1000, task="t")
    with pytest.raises(PayloadTooLarge, match="over the limit of 10 bytes"):
        encode_payload([], {}, max_bytes=10, task="t")


def test_an_int_too_long_for_text_says_so() -> None:
    with pytest.raises(NotSerializable, match=r"argument 0 of task 't'.*digits"):
        encode_payload([10**5000], {}, max_bytes=10**6, task="t")


def test_payload_round_trips() -> None:
    text = encode_payload([1, "a"], {"k": [None]}, max_bytes=1000, task="t")
    assert json.loads(text) == {"args": [1, "a"], "kwargs": {"k": [None]}}
    assert decode_payload(text) == ([1, "a"], {"k": [None]})


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"args": 1}', '{"kwargs": []}', ""])
def test_decode_payload_refuses_what_we_did_not_write(text: str) -> None:
    with pytest.raises(ValueError):  # noqa: PT011 - any ValueError; the runner reports it
        decode_payload(text)


def test_decode_of_none_is_none() -> None:
    assert decode(None) is None


def test_visible_escapes_what_does_not_print_and_keeps_the_value() -> None:
    """A control, a format character (even one past U+FFFF) and a lone surrogate read
    as JSON escapes; printable text and the characters kept stay as they are."""
    value = ["caf\u00e9 \u65e5\U0001f600", "\u202e\u200b\x85\x7f\ud800\U000e0001", "a\nb\tc"]
    text = visible(json.dumps(value, ensure_ascii=False))
    assert text == (
        '["caf\u00e9 \u65e5\U0001f600", "\\u202e\\u200b\\u0085\\u007f\\ud800\\udb40\\udc01", '
        '"a\\nb\\tc"]'
    )
    assert json.loads(text) == value
    assert visible("line\n\tnext\u202e", keep="\n\t") == "line\n\tnext\\u202e"
    assert visible("line\nnext", keep="\n") == "line\nnext"
