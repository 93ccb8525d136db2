"""Request bodies as strict JSON, one parser for every REST route.

Python's `json` accepts what JSON (RFC 8259) does not, or what no route can use, and each of
these once reached a handler and came back as a 500: `NaN` / `Infinity` and numbers beyond a
double; strings with a lone UTF-16 surrogate (`"\\ud800"`), which are not text and which the
tokenizer refuses with a TypeError; nesting deep enough to raise RecursionError; integers with
more digits than Python converts. `parse` refuses all of them, duplicate object keys (which of
the two a parser keeps differs between parsers; we take neither) and integers beyond 64 bits
too (the KServe SDK's parser, orjson, reads those as doubles: a seed of -2^63 - 1 was taken as
-2^63 where the same body sent as another content type was refused), with a `BadJSON`
that names where in the body the problem is (`instances[0].prompt`), so a route answers 400.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Nothing in our payloads nests deeper than a V2 tensor's data (a few levels); the cap keeps
# every later walk over a body (ours, pydantic's, KServe's) far from the recursion limit.
MAX_DEPTH = 64

# A lone surrogate can only come from a \uD800-\uDFFF escape: strict UTF-8 cannot encode one.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
# An integer beyond 64 bits has 19 digits at least: only a body with such a run of digits
# takes parse_int (a hook is a Python call per integer, and a V2 body may hold 500,000).
_LONG_DIGITS = re.compile(r"\d{19}")


class BadJSON(ValueError):
    """The body is not JSON a route can take; `param` is the top-level field it is in."""

    def __init__(self, message: str, param: str | None = None, syntax: bool = False):
        super().__init__(message)
        self.param = param
        self.syntax = syntax  # not JSON at all, rather than JSON we refuse


class _Duplicate(dict):
    """An object whose key `duplicate` came more than once (found by the walk, with its path)."""

    duplicate: str


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        dup = next(k for k, _ in pairs if k in seen or seen.add(k))
        out = _Duplicate(pairs)
        out.duplicate = dup
    return out


class _NotANumber(float):
    """NaN, Infinity, -Infinity or a number beyond a double, as written (found by the walk,
    with its path)."""

    literal: str


def _constant(literal: str) -> float:
    value = _NotANumber("nan")
    value.literal = literal
    return value


class _Wide(int):
    """An integer beyond 64 bits (found by the walk, with its path)."""


def _integer(literal: str) -> int:
    try:
        value = int(literal)
    except ValueError:  # more digits than int() converts (4,300)
        return _Wide(2**64)
    return value if -2**63 <= value < 2**64 else _Wide(value)


def _float(literal: str) -> float:
    value = float(literal)
    if not math.isfinite(value):  # 1e400: beyond a double, Python's parser makes it inf
        return _constant(literal[:20])
    return value


def parse(raw: bytes | str) -> Any:
    """The JSON value of a request body, or BadJSON saying why it is not one we take."""
    text_given = isinstance(raw, str)  # may hold surrogates itself, not only escapes
    if isinstance(raw, bytes):
        try:  # strictly: json.loads(bytes) would pass UTF-8-encoded surrogates (ED A0 80)
            raw = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadJSON("request body is not valid UTF-8") from None
    try:
        value = json.loads(raw, parse_constant=_constant, parse_float=_float,
                           parse_int=_integer if _LONG_DIGITS.search(raw) else None,
                           object_pairs_hook=_pairs)
    except RecursionError:
        field = _deep_field(raw)
        where = f"'{field}' " if field else "request body "
        raise BadJSON(f"{where}nests deeper than {MAX_DEPTH} levels", field) from None
    except json.JSONDecodeError as e:
        raise BadJSON(f"request body is not valid JSON ({e})", syntax=True) from None
    _walk(value, check_strings=text_given or bool(_SURROGATE_ESCAPE.search(raw)))
    return value


def _walk(value: Any, check_strings: bool) -> None:
    """Depth, duplicate keys, numbers that are not JSON's, integers beyond 64 bits and (when
    the body has surrogate escapes) lone surrogates, with the path of the first problem;
    iterative, so a deep body cannot exhaust the stack."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if isinstance(item, dict):
            if depth >= MAX_DEPTH:
                raise BadJSON(f"request body nests deeper than {MAX_DEPTH} levels",
                              _top(path))
            if isinstance(item, _Duplicate):
                where = _join(path, item.duplicate)
                raise BadJSON(f"'{where}' is given more than once", _top(where))
            for key, child in item.items():
                child_path = _join(path, key)
                if check_strings and _lone_surrogate(key):
                    raise BadJSON(f"a key in '{path or 'the body'}' holds a lone UTF-16 "
                                  "surrogate escape, which is not text", _top(path) or None)
                stack.append((child, child_path, depth + 1))
        elif isinstance(item, list):
            if depth >= MAX_DEPTH:
                raise BadJSON(f"request body nests deeper than {MAX_DEPTH} levels",
                              _top(path))
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))
        elif isinstance(item, _NotANumber):
            raise BadJSON(f"'{path or 'the body'}' is {item.literal}, which is not a JSON "
                          "number (NaN, Infinity and numbers beyond a double are not)",
                          _top(path))
        elif isinstance(item, _Wide):
            raise BadJSON(f"'{path or 'the body'}' is an integer beyond 64 bits, which no "
                          "field takes", _top(path))
        elif check_strings and isinstance(item, str) and _lone_surrogate(item):
            raise BadJSON(f"'{path or 'the body'}' holds a lone UTF-16 surrogate escape "
                          "(\\ud800-\\udfff without its pair), which is not text", _top(path))


_TOKENS = re.compile(r'"((?:[^"\\]|\\.)*)"(\s*:)?|[\[\]{}]')


def _deep_field(text: str) -> str | None:
    """The top-level field in which a body too deep for the parser first nests past
    MAX_DEPTH; scans only up to that point."""
    depth, field = 0, None
    for token in _TOKENS.finditer(text):
        char = token.group(0)
        if char in "[{":
            depth += 1
            if depth > MAX_DEPTH:
                return field
        elif char in "]}":
            depth -= 1
        elif token.group(2) and depth == 1:
            field = token.group(1).encode("utf-8", "backslashreplace").decode()[:40]
    return None


def _lone_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _join(path: str, key: str) -> str:
    key = key.encode("utf-8", "backslashreplace").decode("utf-8")[:40]
    return f"{path}.{key}" if path else key


def _top(path: str) -> str | None:
    """The top-level field a path is in (OpenAI's `param`)."""
    return re.split(r"[.\[]", path, maxsplit=1)[0] or None if path else None


def json_part_length(header: str | bytes) -> int | None:
    """The length of a body's JSON part that KServe's binary tensor extension gives in
    Inference-Header-Content-Length, or None where it is not one: ASCII digits only, and at
    most 18 of them (str.isdigit also takes '²', and int() refuses more than 4,300 digits)."""
    if not (header.isascii() and header.isdigit()) or len(header) > 18:
        return None
    return int(header)


def kind(value: Any) -> str:
    """What a parsed JSON value is, in JSON's words (for messages: not Python's NoneType)."""
    for python, name in ((type(None), "null"), (bool, "a boolean"), ((int, float), "a number"),
                         (str, "a string"), (list, "an array")):
        if isinstance(value, python):
            return name
    return "an object"
