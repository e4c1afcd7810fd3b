"""States <-> npz bytes: every allowed value round-trips bit for bit; nothing is unpickled."""
from __future__ import annotations

import io
import os
import pickle

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from pipeline.results.state import StateError, check_state, from_npz_bytes, to_npz_bytes


def _same(a, b) -> bool:
    """Equal as states: same keys, same types, arrays with the same dtype, shape and bits."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, np.ndarray):
        return (isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
                and a.tobytes() == b.tobytes())
    if isinstance(a, list):   # element by element: [nan] == [nan] only for the same object
        return isinstance(b, list) and len(a) == len(b) and all(map(_same, a, b))
    if isinstance(a, float) and np.isnan(a):
        return isinstance(b, float) and np.isnan(b)
    return type(a) is type(b) and a == b


_scalars = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 62, 2 ** 62),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8))
_arrays = hnp.arrays(st.sampled_from([np.float32, np.float64, np.int64, np.int32, np.uint8,
                                      np.bool_, np.complex128]),
                     hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=4))
_leaves = st.one_of(_scalars, _arrays, st.lists(_scalars, max_size=4))
_keys = st.text(max_size=6).filter(lambda k: k != "$array")      # the one reserved key
_states = st.recursive(st.dictionaries(_keys, _leaves, max_size=4),
                       lambda inner: st.dictionaries(_keys,
                                                     st.one_of(_leaves, inner), max_size=4),
                       max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(_states)
def test_every_allowed_state_round_trips_exactly(state):
    assert _same(state, from_npz_bytes(to_npz_bytes(state)))


@pytest.mark.parametrize("bad, where", [
    ({"a": np.array([object()], dtype=object)}, "state['a']"),
    ({"a": {"b": (1, 2)}}, "state['a']['b']"),
    ({"a": np.float32(1.0)}, "state['a']"),                      # numpy scalar: not JSON
    ({"a": [1, [2]]}, "state['a']"),                             # lists hold scalars only
    ({1: 2}, "state"),
    ({"a": {"$array": "a0"}}, "state['a']"),                      # the reserved tree key
    ({"a": np.array(["x"])}, "state['a']"),                       # strings go in JSON
])
def test_values_that_need_pickle_are_refused_by_name(bad, where):
    with pytest.raises(StateError) as e:
        to_npz_bytes(bad)
    assert str(e.value).startswith(where)
    with pytest.raises(StateError):
        check_state(bad)


class _Plant:
    """A pickle that, once loaded, would create a file: proof that no code ran."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_planted_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = str(tmp_path / "ran")
    raw = pickle.dumps({"state": _Plant(marker)})
    with pytest.raises(StateError, match="not a partial state"):
        from_npz_bytes(raw)
    # the same object hidden in an .npz member: np.load refuses it without allow_pickle
    buf = io.BytesIO()
    np.savez(buf, a0=np.array([_Plant(marker)], dtype=object),
             **{"$tree": np.frombuffer(b'{"x": {"$array": "a0"}}', np.uint8)})
    with pytest.raises(StateError, match="not a partial state"):
        from_npz_bytes(buf.getvalue())
    assert not os.path.exists(marker)


def test_bytes_without_a_tree_are_no_state():
    buf = io.BytesIO()
    np.savez(buf, a=np.arange(3))
    with pytest.raises(StateError, match="no tree"):
        from_npz_bytes(buf.getvalue())
    with pytest.raises(StateError):
        from_npz_bytes(b"")
