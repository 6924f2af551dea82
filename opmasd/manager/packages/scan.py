"""Finds agent packages: folders with an agent.yaml under the configured agents directories.

Skips `__pycache__`, `_template`, `test*` and hidden folders. A broken manifest is returned as
an error beside the good ones, never raised: one bad package must not hide the others.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from opmasd.core.model import AgentSpec
from opmasd.manager.packages.manifest import MANIFEST_NAME, Manifest, ManifestError, load_manifest

log = structlog.get_logger(__name__)


@dataclass
class ScanResult:
    manifests: list[Manifest] = field(default_factory=list)
    errors: list[ManifestError] = field(default_factory=list)


def _skipped(folder: Path) -> bool:
    name = folder.name
    return name == "__pycache__" or name == "_template" or name.startswith(("test", "."))


def scan(dirs: Iterable[Path], defaults: AgentSpec | None = None) -> ScanResult:
    result = ScanResult()
    seen: dict[str, Path] = {}
    for root in dirs:
        if not root.is_dir():
            log.debug("agents directory absent", path=str(root))
            continue
        try:
            folders = sorted(p for p in root.iterdir() if p.is_dir() and not _skipped(p))
        except OSError as exc:
            error = ManifestError(root, f"cannot read the agents directory: {exc.strerror or exc}")
            log.warning("agents directory unreadable", path=str(root), error=error.message)
            result.errors.append(error)
            continue
        for folder in folders:
            path = folder / MANIFEST_NAME
            if not path.is_file():
                continue
            try:
                manifest = load_manifest(path, defaults)
            except ManifestError as exc:
                log.warning("agent manifest rejected", path=str(exc.path), error=exc.message)
                result.errors.append(exc)
                continue
            if manifest.agent_id in seen:
                error = ManifestError(
                    manifest.path,
                    f"agent id {manifest.agent_id!r} is already used by {seen[manifest.agent_id]}",
                )
                log.warning("agent manifest rejected", path=str(error.path), error=error.message)
                result.errors.append(error)
                continue
            seen[manifest.agent_id] = manifest.path
            result.manifests.append(manifest)
    return result
