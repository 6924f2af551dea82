"""Labels and label selectors: Kubernetes' grammar, so a selector means what it means to kubectl."""

from __future__ import annotations

import re

import pytest

from opmasd.core.labels import (
    MAX_LABELS,
    SelectorError,
    label_errors,
    parse_selector,
)

PROD_WEB = {"env": "prod", "role": "web"}
DEV_PROBE = {"env": "dev", "role": "probe"}
BARE: dict[str, str] = {}


@pytest.mark.parametrize(
    ("selector", "matching"),
    [
        ("", {"prod_web", "dev_probe", "bare"}),
        ("env=prod", {"prod_web"}),
        ("env==prod", {"prod_web"}),
        ("env!=prod", {"dev_probe", "bare"}),  # != also matches an agent without the label
        ("env=prod,role!=probe", {"prod_web"}),
        (" env = prod , role != web ", set()),
        ("env in (prod, dev)", {"prod_web", "dev_probe"}),
        ("env notin (prod)", {"dev_probe", "bare"}),
        ("role", {"prod_web", "dev_probe"}),
        ("!role", {"bare"}),
        ("env=", set()),  # an empty value is a value: only a label env with "" matches
        ("example.com/tier=1", set()),
    ],
)
def test_selector_matches_as_kubectl(selector: str, matching: set[str]) -> None:
    agents = {"prod_web": PROD_WEB, "dev_probe": DEV_PROBE, "bare": BARE}
    parsed = parse_selector(selector)
    assert {name for name, labels in agents.items() if parsed.matches(labels)} == matching


def test_empty_value_matches_a_label_with_an_empty_value() -> None:
    assert parse_selector("env=").matches({"env": ""})
    assert not parse_selector("env=").matches({})


@pytest.mark.parametrize(
    ("selector", "complaint"),
    [
        ("env=prod,", "empty requirement"),
        (",env=prod", "empty requirement"),
        ("env in (a,b", "'(' without its ')'"),
        ("env in ((a))", "nested"),
        ("env)", "')' without its '('"),
        ("env in ()", "set of values is empty"),
        ("env>1", "is not a requirement"),
        ("env=prod=x", "is not a requirement"),
        ("-env=prod", "a name is 1-63"),
        ("env=" + "x" * 64, "a value is empty or 1-63"),
        ("Bad_Prefix/name=x", "prefix must be a DNS subdomain"),
        ("x" * 5000, "at most 4096"),
    ],
)
def test_a_bad_selector_names_what_is_wrong(selector: str, complaint: str) -> None:
    with pytest.raises(SelectorError, match=re.escape(complaint)):
        parse_selector(selector)


def test_label_grammar() -> None:
    assert (
        label_errors({"env": "prod", "app.kubernetes.io/name": "sysmon", "tier": "", "a_b.c-d": "X.1"}) == []
    )
    assert label_errors({"": "x"})[0].startswith("key '' has an empty name")
    assert "a name is 1-63" in label_errors({"-x": "y"})[0]
    assert "a name is 1-63" in label_errors({"x" * 64: "y"})[0]
    assert "a value is empty or 1-63" in label_errors({"x": "has space"})[0]
    assert "prefix" in label_errors({"/x": "y"})[0]
    too_many = {f"k{i}": "v" for i in range(MAX_LABELS + 1)}
    assert label_errors(too_many) == [f"has {MAX_LABELS + 1} labels; at most {MAX_LABELS}"]


def test_an_error_shows_a_long_key_shortened() -> None:
    (error,) = label_errors({"k" * 1000: "v"})
    assert len(error) < 300
