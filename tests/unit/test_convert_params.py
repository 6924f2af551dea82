"""Command parameters from the API: non-finite numbers and deep nesting are field errors."""

from __future__ import annotations

import math

import pytest
from google.protobuf import struct_pb2

from opmasd.api.convert import MAX_PARAMS_DEPTH, struct_to_dict
from opmasd.core.errors import InvalidArgument


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
def test_non_finite_numbers_are_refused(number: float) -> None:
    params = struct_pb2.Struct()
    params.update({"ok": 1, "nested": {"list": [1, 2]}})
    params["nested"]["list"].append(number)
    with pytest.raises(InvalidArgument, match="not a finite number") as raised:
        struct_to_dict(params)
    assert raised.value.violations[0].field == "params"


def test_nesting_past_the_limit_is_refused_and_up_to_it_accepted() -> None:
    def nested(depth: int) -> struct_pb2.Struct:
        value: object = 1
        for _ in range(depth - 1):
            value = {"a": value}
        params = struct_pb2.Struct()
        params.update({"a": value})
        return params

    assert struct_to_dict(nested(MAX_PARAMS_DEPTH))
    with pytest.raises(InvalidArgument, match="nested deeper"):
        struct_to_dict(nested(MAX_PARAMS_DEPTH + 1))
