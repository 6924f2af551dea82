"""YAML read strictly: safe_load, except that a key given twice is an error, not a silent
overwrite, and aliases (`*name`) are refused.

The configuration and agent manifests are both read through this, so the same file mistakes
are caught in both. Aliases go because a few of them nest into billions of values ("billion
laughs": a 1 KiB manifest took gigabytes and held the daemon), and neither file needs them.
"""

from __future__ import annotations

from typing import Any

import yaml


class _StrictLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice is an error: PyYAML would keep the last one
    and silently drop the first, which hides exactly the mistakes a config check is there for."""

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not accepted", event.start_mark
            )
        return super().compose_node(parent, index)


def _construct_mapping(loader: _StrictLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    loader.flatten_mapping(node)
    seen: set[Any] = set()
    for key_node, _ in node.value:
        if not isinstance(key_node, yaml.ScalarNode):
            continue  # construct_mapping reports unhashable keys itself
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def load_yaml(text: str) -> object:
    """yaml.safe_load that also rejects duplicate keys; raises yaml.YAMLError."""
    return yaml.load(text, Loader=_StrictLoader)
