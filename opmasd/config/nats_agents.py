"""The data subjects agents may use on the embedded NATS server: nats.agent_publish and
nats.agent_subscribe (lists of subject patterns).

They take effect only with the embedded server, which gives each agent a login allowed its own
subjects and these; an external server's own configuration says what each login may do, so
with nats.url set they are refused rather than ignored. A pattern that could reach beyond data
(the subject prefix's tree, request inboxes) is refused with the reason (bus.subject_patterns).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NoReturn

from opmasd.bus.embedded_users import DEFAULT_DATA_SUBJECTS
from opmasd.bus.subject_patterns import check_data_pattern, check_pattern

KEYS = ("agent_publish", "agent_subscribe")

Refuse = Callable[[str, str], NoReturn]


def parse_subject_patterns(value: object) -> tuple[str, ...]:
    """A YAML list of subject patterns, or one string of them separated by commas."""
    if isinstance(value, str):
        items: list[object] = [item.strip() for item in value.split(",") if item.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise ValueError(f"must be a list of NATS subject patterns, got {value!r}")
    patterns = []
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"must be a list of NATS subject patterns (strings), got {item!r}")
        check_pattern(item.strip())
        patterns.append(item.strip())
    return tuple(patterns)


def check_agent_subjects(nats: dict[str, Any], refuse: Refuse) -> None:
    """Refuse (refuse(key, why)) data subjects that would be ignored or reach too far."""
    given = [key for key in KEYS if key in nats]
    if nats.get("url"):
        if given:
            refuse(
                given[0],
                "applies to the embedded NATS server only (nats.url empty): an external server's "
                "own configuration says what each login may publish and subscribe to; remove it",
            )
        return
    prefix = nats.get("subject_prefix", "agent")
    for key in KEYS:
        for pattern in nats.get(key, DEFAULT_DATA_SUBJECTS):
            try:
                check_data_pattern(pattern, prefix)
            except ValueError as exc:
                if key in nats:
                    refuse(key, str(exc))
                refuse(
                    "subject_prefix",
                    f"{prefix!r} clashes with the default nats.{key} ({', '.join(DEFAULT_DATA_SUBJECTS)}): "
                    f"{exc}; choose another prefix, or set nats.{key}",
                )
