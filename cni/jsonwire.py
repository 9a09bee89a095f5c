"""JSON for the plugin executable's hot path, from CPython's ``_json`` accelerator alone.

``import json`` pulls in ``re``, ``enum`` and friends: 5-10 ms of a start-up budget of ~15 ms
(the reference Go plugins finish a whole ADD in about that). The C scanner and encoder that ``json``
itself uses need none of that. On malformed input the stdlib ``json`` is imported after all, so
error messages are the usual ones; only well-formed input takes the fast road.
"""

from __future__ import annotations

import _json

TYPE_CHECKING = False  # not `from typing import ...`: typing costs ~5 ms of start-up

if TYPE_CHECKING:
    from typing import Any


class _ScannerContext:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int

    @staticmethod
    def parse_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")


def _refuse(obj: Any) -> Any:
    raise TypeError(f"{type(obj).__name__} is not JSON serializable")


_scan = _json.make_scanner(_ScannerContext())
# (markers, default, encoder, indent, key_separator, item_separator, sort_keys, skipkeys, allow_nan)
_encode = _json.make_encoder(None, _refuse, _json.encode_basestring_ascii, None, ":", ",", False, False, False)
_WHITESPACE = " \t\n\r"


def loads(data: bytes | str) -> Any:
    """Parse one JSON document; raises ``ValueError`` (``json.JSONDecodeError``) if malformed."""
    text = data.decode("utf-8") if isinstance(data, bytes) else data
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = _scan(text, start)
        if not text[end:].strip(_WHITESPACE):
            return value
    except Exception:  # noqa: S110 - the stdlib parser below reports it properly
        pass
    import json

    return json.loads(text)


def dumps(obj: Any) -> str:
    return "".join(_encode(obj, 0))
