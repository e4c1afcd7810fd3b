"""Accumulator state <-> bytes without pickle: a partial result as plain arrays and a JSON tree.

A state is what an accumulator's (or a collection's) `state()` returns: a dict with str keys
whose values are numpy arrays (any numeric or bool dtype, never `object`), JSON scalars (str,
int, float, bool, None), lists of JSON scalars, or dicts of the same kind. Nothing else: so a
partial under `<out>/_partials/` is data, and loading one runs no code (np.load with
allow_pickle=False; json.loads).

    data = to_npz_bytes(state)          # one .npz: every array, plus the tree as JSON bytes
    state = from_npz_bytes(data)        # equal to `state`: same keys, dtypes, shapes, values
    check_state(state)                  # TypeError naming the first value that is not allowed

The engine of jobs/runtime stores partials with these two functions; accumulators' tests call
`check_state` on what they return.
"""
from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

__all__ = ["check_state", "to_npz_bytes", "from_npz_bytes", "StateError"]

_ARRAY = "$array"          # a tree node {"$array": name}: the array stored under that name
_TREE = "$tree"            # the npz member holding the JSON tree (uint8)
_SCALARS = (str, int, float, bool, type(None))


class StateError(TypeError):
    """A state holds a value that cannot be stored without pickle, or bytes that are no state."""


def check_state(state: Any, path: str = "state") -> None:
    """Raise StateError naming the first value of `state` that is not allowed (see the module
    docstring); return None when every value is."""
    if not isinstance(state, dict):
        raise StateError(f"{path} must be a dict, got {type(state).__name__}")
    for key, value in state.items():
        where = f"{path}[{key!r}]"
        if not isinstance(key, str):
            raise StateError(f"{where}: keys must be str, got {type(key).__name__}")
        if isinstance(value, dict):
            if _ARRAY in value:
                raise StateError(f"{where}: the key {_ARRAY!r} is reserved")
            check_state(value, where)
        elif isinstance(value, np.ndarray):
            if value.dtype.hasobject or value.dtype.kind not in "biufc":
                raise StateError(f"{where}: arrays must be numeric or bool, got dtype "
                                 f"{value.dtype}")
        elif isinstance(value, list):
            bad = next((v for v in value if not isinstance(v, _SCALARS)), None)
            if bad is not None:
                raise StateError(f"{where}: lists may hold only str, int, float, bool or None, "
                                 f"got {type(bad).__name__}")
        elif not isinstance(value, _SCALARS):
            raise StateError(f"{where}: a {type(value).__name__} is not a state value; allowed: "
                             "numpy arrays, str, int, float, bool, None, lists of those, dicts")


def _split(state: dict, arrays: dict[str, np.ndarray]) -> dict:
    """The JSON tree of `state`, its arrays moved into `arrays` under generated names."""
    tree = {}
    for key, value in state.items():
        if isinstance(value, dict):
            tree[key] = _split(value, arrays)
        elif isinstance(value, np.ndarray):
            name = f"a{len(arrays)}"
            arrays[name] = value
            tree[key] = {_ARRAY: name}
        else:
            tree[key] = value
    return tree


def to_npz_bytes(state: dict) -> bytes:
    """`state` as the bytes of one uncompressed .npz (checked first: StateError)."""
    check_state(state)
    arrays: dict[str, np.ndarray] = {}
    tree = _split(state, arrays)
    # allow_nan: a float such as a NaN image mean round-trips (Python's json reads it back)
    arrays[_TREE] = np.frombuffer(json.dumps(tree, allow_nan=True).encode(), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, allow_pickle=False, **arrays)
    return buf.getvalue()


def _join(tree: dict, arrays: Any) -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and set(value) == {_ARRAY}:
            out[key] = arrays[value[_ARRAY]]
        elif isinstance(value, dict):
            out[key] = _join(value, arrays)
        else:
            out[key] = value
    return out


def from_npz_bytes(data: bytes) -> dict:
    """The state `to_npz_bytes` wrote; a pickled object array (or anything but such an .npz)
    raises StateError, never runs code."""
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            arrays = {name: npz[name] for name in npz.files}
    except (ValueError, OSError, EOFError) as e:      # pickled member, not an npz, truncated
        raise StateError(f"not a partial state written by to_npz_bytes ({e})") from None
    if _TREE not in arrays:
        raise StateError("not a partial state written by to_npz_bytes (no tree)")
    tree = json.loads(arrays.pop(_TREE).tobytes().decode())
    return _join(tree, arrays)
