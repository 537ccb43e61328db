"""Hypothesis fuzzing of the spec loader: arbitrary YAML never produces anything but a SpecError."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from m3export.errors import SpecError
from m3export.spec import M3Spec, load_spec, parse_spec

TINY = yaml.safe_load((Path(__file__).resolve().parents[1] / "specs" / "m3-tiny.yaml").read_text())

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
)
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(d, dict):
        for k, v in d.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            out += _paths(v, (*prefix, i))
    return out


PATHS = _paths(TINY)


def _accepts(data: Any) -> None:
    try:
        assert isinstance(parse_spec(data), M3Spec)
    except SpecError as err:
        msg = str(err)
        assert msg and "\n" not in msg


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), value=values)
def test_mutated_spec_never_tracebacks(path: tuple[Any, ...], value: Any) -> None:
    data = copy.deepcopy(TINY)
    cur = data
    for p in path[:-1]:
        cur = cur[p]
    cur[path[-1]] = value
    _accepts(data)


@settings(max_examples=150, deadline=None)
@given(values)
def test_arbitrary_structure_never_tracebacks(data: Any) -> None:
    _accepts(data)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(max_size=200))
def test_arbitrary_yaml_text_never_tracebacks(tmp_path_factory: Any, text: str) -> None:
    f = tmp_path_factory.mktemp("fuzz") / "spec.yaml"
    f.write_text(text)
    try:
        load_spec(f)
    except SpecError as err:
        assert "\n" not in str(err)
