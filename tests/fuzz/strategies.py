"""Hypothesis strategies for what a careless, buggy or hostile client sends.

Three families of request bodies:

- `json_bodies`: any JSON at all, with object keys drawn mostly from the
  field names the coordinator reads, so that wrong types land on real fields;
- `mutations(valid)`: a valid body (the real agent's heartbeat, the test
  fixtures) with one to three changes: a field deleted, retyped, pushed past
  its bounds, given an odd string, or an extra field added;
- `raw_bodies(valid)`: bytes no JSON encoder would produce: invalid UTF-8
  (alone or inside a string value), NaN and Infinity literals, numbers with
  thousands of digits, nesting deeper than the interpreter's recursion
  limit, escaped NUL and lone surrogates, truncations and trailing junk.

Strings are surrogate-free (a JSON encoder cannot produce them) but include
NUL, bidirectional marks, emoji, combining characters and lengths on either
side of every bound the API states.
"""

import copy
import json
from typing import Any

import msgspec
from hypothesis import strategies as st

from islands.agent import (
    ActiveJobMetrics,
    Capabilities,
    EnhancedHeartbeat,
    GpuMetrics,
    HostRegistration,
    JobStatus,
    JobSubmission,
    PerformanceEstimates,
    PollRequest,
    SystemMetrics,
)
from islands.mobile import MobileDevice, MobilePairRequest

STRUCTS: list[type[msgspec.Struct]] = [
    HostRegistration,
    PollRequest,
    Capabilities,
    EnhancedHeartbeat,
    SystemMetrics,
    GpuMetrics,
    ActiveJobMetrics,
    PerformanceEstimates,
    JobStatus,
    JobSubmission,
    MobilePairRequest,
    MobileDevice,
]
# Every field name any endpoint reads: random objects mostly use these keys.
FIELD_NAMES = sorted({field.name for struct in STRUCTS for field in msgspec.structs.fields(struct)})

# Characters that have broken parsers, databases and terminals before.
ODD_CHARACTERS = [
    "\x00",  # PostgreSQL refuses it in text and jsonb
    "\x1f",
    "\x7f",
    "\n",
    "\r",
    "\t",
    "\u0085",  # NEXT LINE
    "\u00a0",
    "\u200b",  # ZERO WIDTH SPACE
    "\u200d",  # ZERO WIDTH JOINER
    "\u200e",  # LEFT-TO-RIGHT MARK
    "\u200f",  # RIGHT-TO-LEFT MARK
    "\u202e",  # RIGHT-TO-LEFT OVERRIDE
    "\u2028",  # LINE SEPARATOR
    "\ufeff",  # BYTE ORDER MARK
    "\ufffd",
    "\uffff",
    "\u0301",  # COMBINING ACUTE ACCENT
    "\u0336",  # COMBINING LONG STROKE OVERLAY
    "\U0001f3dd",  # DESERT ISLAND
    "\U0010ffff",
    "İ",  # lower() makes it longer
    "ß",  # upper() makes it longer
    "ﬀ",
    "\\",
    '"',
    "'",
    "%",
    "/",
    "$",
    "`",
    "{",
    "<",
]

# Lengths just inside and just outside the API's stated bounds (host_id 8
# to 64, short texts 64, texts 128, accelerators 32, errors 2,000), and long.
BOUNDARY_LENGTHS = [0, 1, 7, 8, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1999, 2000, 2001, 5000]

ODD_STRINGS = [
    "",
    " ",
    "\x00",
    "null",
    "true",
    "0",
    "-1",
    "1e308",
    "NaN",
    "Infinity",
    "online",
    "offline",
    "succeeded",
    "../../etc/passwd",
    "<script>alert(1)</script>",
    "'; DROP TABLE islands_island; --",
    "%00",
    "e\u0301" * 40,  # 40 characters that render as 40 letters, 80 code points
    "\u202eevil.exe",
    "\U0001f3dd\ufe0f",
    "\U0001f469\u200d\U0001f4bb",  # a ZWJ emoji sequence
    "A3X9K2",
    "a3x9k2\n",
    "550e8400-e29b-41d4-a716-446655440000\n",  # a valid id with a trailing newline
    "job-0001\n",
    "2.0\n",
    "2.0\x00",
    "isl_",
    "dsp_",
]


def odd_text(max_size: int = 80) -> st.SearchStrategy[str]:
    return st.one_of(
        st.text(max_size=max_size),
        st.text(alphabet=st.sampled_from(ODD_CHARACTERS), max_size=max_size),
        st.sampled_from(ODD_STRINGS),
        st.builds(
            lambda char, n: char * n,
            st.sampled_from(["a", "é", "\U0001f3dd", "\x00"]),
            st.sampled_from(BOUNDARY_LENGTHS),
        ),
    )


# Integers and floats at and past every bound: 2^31 for megabytes, 2^53 for
# counts and timestamps, 64-bit limits, and floats to the edge of the double.
ODD_NUMBERS: list[int | float] = [
    0,
    -0.0,
    -1,
    0.5,
    1.5,
    2**31 - 1,
    2**31,
    2**53,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64,
    2**70,
    -(2**70),
    10**12,
    10**12 + 1,
    1e12,
    1e300,
    1e308,
    -1e308,
    5e-324,
    604_800,
    604_801,
    99_999_999,
    100_000_000,
]


def numbers() -> st.SearchStrategy[int | float]:
    return st.one_of(
        st.integers(),
        st.floats(allow_nan=False, allow_infinity=False),
        st.sampled_from(ODD_NUMBERS),
    )


def keys() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(FIELD_NAMES), odd_text(max_size=20))


def leaves() -> st.SearchStrategy[Any]:
    return st.one_of(st.none(), st.booleans(), numbers(), odd_text())


json_values: st.SearchStrategy[Any] = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.dictionaries(keys(), children, max_size=4),
    ),
    max_leaves=12,
)


def encode(value: Any, ensure_ascii: bool = True) -> bytes:
    return json.dumps(value, ensure_ascii=ensure_ascii).encode()


# A JSON object using the coordinator's field names most of the time, or any
# JSON value at all, encoded with or without \u escapes.
json_bodies: st.SearchStrategy[bytes] = st.builds(
    encode,
    st.one_of(st.dictionaries(keys(), json_values, max_size=8), json_values),
    st.booleans(),
)


# --- Mutations of valid bodies ---------------------------------------------------


type Path = tuple[str | int, ...]


def paths(value: Any, path: Path = ()) -> list[Path]:
    """Every position in a JSON value, the root included, parents first."""
    found = [path]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, (*path, index))
    return found


def value_at(value: Any, path: Path) -> Any:
    for step in path:
        value = value[step]
    return value


def _edge_variants(value: Any) -> list[Any]:
    """Values next to `value` that a validator might let slip."""
    if isinstance(value, bool):
        return [not value, int(value), str(value).lower(), None]
    if isinstance(value, int):
        return [value + 1, value - 1, -value - 1, value * 2**31, 2**70, float(value), str(value), None]
    if isinstance(value, float):
        return [-value, value * 1e300, int(value) if abs(value) < 1e18 else 0, str(value), None]
    if isinstance(value, str):
        return [
            value + "\n",
            value + "\x00",
            "\x00" + value,
            value + " ",
            " " + value,
            value.upper(),
            value * 70,
            value + "\u202e",
            value + "\U0001f3dd",
            value[:-1],
            "",
            [value],
            {"value": value},
            None,
        ]
    if isinstance(value, list):
        return [value * 70, [], [value], {}, None, value[:1] * 300]
    if isinstance(value, dict):
        return [[value], [], {}, "object", None]
    return [0, "", [], {}]


@st.composite
def _mutate_once(draw: st.DrawFn, body: Any) -> Any:
    body = copy.deepcopy(body)
    path = draw(st.sampled_from(paths(body)))
    target = value_at(body, path)
    operations = ["replace", "edge"]
    if path:
        operations.append("delete")
    if isinstance(target, dict):
        operations.append("add_field")
    if isinstance(target, list):
        operations.append("append")
    operation = draw(st.sampled_from(operations))
    if operation == "add_field":
        target[draw(keys())] = draw(json_values)
        return body
    if operation == "append":
        target.append(draw(json_values))
        return body
    if operation == "delete":
        parent = value_at(body, path[:-1])
        del parent[path[-1]]
        return body
    new = draw(st.sampled_from(_edge_variants(target))) if operation == "edge" else draw(json_values)
    if not path:
        return new
    value_at(body, path[:-1])[path[-1]] = new
    return body


@st.composite
def mutated_values(draw: st.DrawFn, valid: list[Any]) -> Any:
    body = draw(st.sampled_from(valid))
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        body = draw(_mutate_once(body))
    return body


def mutations(valid: list[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(encode, mutated_values(valid), st.booleans())


# --- Raw bytes ---------------------------------------------------------------------

# Byte sequences that are not UTF-8: a lone continuation byte, an overlong
# "/", a UTF-8-encoded surrogate, a truncated sequence, bytes past U+10FFFF,
# Latin-1 text.
INVALID_UTF8 = [
    b"\xff",
    b"\xfe\xff",
    b"\x80",
    b"\xc0\xaf",
    b"\xed\xa0\x80",
    b"\xe2\x82",
    b"\xf8\x88\x80\x80\x80",
    b"caf\xe9",
]

# Raw JSON-ish tokens to put where a value goes.
RAW_VALUES = [
    b"NaN",
    b"-NaN",
    b"Infinity",
    b"-Infinity",
    b"1e999",
    b"-1e999",
    b"1" * 5000,  # beyond Python's 4,300-digit int conversion limit
    b"0." + b"1" * 5000,
    b"1" * 400 + b".5e-400",
    b"0x10",
    b"01",
    b"+1",
    b".5",
    b"1.",
    b"[" * 3000 + b"]" * 3000,  # deeper than the recursion limit, within 16 KiB
    b"[" * 10_000 + b"]" * 10_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    b'"\\u0000"',
    b'"\\ud800"',  # a lone surrogate, escaped
    b'"\\udc00\\ud800"',
    b'"\\ud83c\\udfdd"',  # a valid pair
    b'"\\x41"',
    b"'single'",
    b"undefined",
    b"True",
    b"None",
    b"\x00",
]

_VALUE_MARK = "\ue000mark\ue001"
_QUOTED_MARK = json.dumps(_VALUE_MARK).encode()  # '"\\ue000mark\\ue001"'
_INNER_MARK = _QUOTED_MARK[1:-1]


def splice(body: Any, path: Path | None, raw: bytes, inside_a_string: bool = False) -> bytes:
    """`body` encoded with the value at `path` (or a new unknown field, for None) replaced by raw bytes."""
    body = copy.deepcopy(body)
    if path is None:
        body["\u2063unknown"] = _VALUE_MARK
    elif path:
        value_at(body, path[:-1])[path[-1]] = _VALUE_MARK
    else:
        body = _VALUE_MARK
    encoded = encode(body)
    if inside_a_string:
        return encoded.replace(_INNER_MARK, b"ok" + raw)
    return encoded.replace(_QUOTED_MARK, raw)


@st.composite
def _spliced(draw: st.DrawFn, valid: list[Any]) -> bytes:
    """A valid body with one value replaced by raw bytes (a token, or bad bytes inside a string)."""
    body = copy.deepcopy(draw(st.sampled_from(valid)))
    if isinstance(body, dict) and draw(st.booleans()):
        # A field the coordinator does not know: skipped unread, but still parsed.
        body[draw(keys())] = _VALUE_MARK
    else:
        path = draw(st.sampled_from(paths(body)))
        if path:
            value_at(body, path[:-1])[path[-1]] = _VALUE_MARK
        else:
            body = _VALUE_MARK
    encoded = encode(body)
    if draw(st.booleans()):
        return encoded.replace(_QUOTED_MARK, draw(st.sampled_from(RAW_VALUES)))
    inside = draw(st.one_of(st.sampled_from(INVALID_UTF8), st.binary(min_size=1, max_size=8)))
    return encoded.replace(_INNER_MARK, b"ok" + inside)


@st.composite
def _reshaped(draw: st.DrawFn, valid: list[Any]) -> bytes:
    """A valid body cut short, wrapped, prefixed or followed by junk."""
    encoded = encode(draw(st.sampled_from(valid)))
    cut = draw(st.integers(min_value=0, max_value=len(encoded)))
    junk = draw(
        st.one_of(
            st.sampled_from([b"", b" ", b"\n", b"\x00", b",", b"}", b"{}", b"\xff"]), st.binary(max_size=8)
        )
    )
    shapes = [
        encoded[:cut],
        encoded + junk,
        junk + encoded,
        b"\xef\xbb\xbf" + encoded,  # a UTF-8 byte order mark
        encoded.decode().encode("utf-16"),
        encoded.decode().encode("utf-32"),
        b"[" + encoded + b"]",
        encoded + encoded,
        encoded.replace(b":", b"=", 1),
        encoded.replace(b'"', b"'"),
        encoded[:1] + encoded[1:-1] * 2 + encoded[-1:],  # duplicate keys
    ]
    return draw(st.sampled_from(shapes))


def raw_bodies(valid: list[Any]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=200),
        st.sampled_from(RAW_VALUES + INVALID_UTF8 + [b"", b" ", b"\n\n", b"{}", b"[]", b"null", b"0"]),
        _spliced(valid),
        _reshaped(valid),
    )


# --- Headers -----------------------------------------------------------------------

CONTENT_TYPES = [
    "application/json",
    "application/json; charset=utf-8",
    "application/json; charset=latin-1",
    "text/plain",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "",
]


def header_text() -> st.SearchStrategy[str]:
    """What can arrive in an HTTP header: Latin-1, as servers decode headers."""
    return st.one_of(
        st.text(alphabet=st.characters(max_codepoint=255), max_size=80),
        st.sampled_from(
            ["Bearer", "Bearer ", "Bearer  ", "Basic dXNlcjpwYXNz", "isl_", "Bearer isl_", "Bearer dsp_"]
        ),
    )
