"""The id an agent gets from its name when none is given."""

from __future__ import annotations

from opmasd.core.ids import agent_id_from_name, is_valid_agent_id


def test_an_id_derived_from_a_long_name_does_not_end_in_a_separator() -> None:
    name = "Very Long Agent Name " * 3 + "x"  # the 63rd character is a space, made a '-'
    derived = agent_id_from_name(name)
    assert not derived.endswith(("-", "_")) and len(derived) <= 63 and is_valid_agent_id(derived)
    assert agent_id_from_name("sysmon") == "sysmon"
