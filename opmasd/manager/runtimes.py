"""Which runtime runs each agent: RuntimeRouter, one Runtime in front of the backends.

An agent's spec names its runtime (`process` or `systemd`); the router sends each call about
an agent to the backend that runs it: the one that launched or adopted its process in this
daemon's life (a spec changed since applies at the next start), else the one its spec names.
A runtime this daemon has no backend for is refused, with why (the systemd runtime needs the
system bus), at registration, update and launch, never silently run by another one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Protocol, runtime_checkable

from opmasd.core.errors import FieldViolation, InvalidArgument, LaunchError
from opmasd.core.model import AgentSpec, ProcessHandle, ProcessUsage, ResourceLimits, RuntimeKind
from opmasd.manager.identities import identity_refusals
from opmasd.manager.privileges import privilege_refusals
from opmasd.runtime.base import ExitHandler, LaunchRequest, LogEntry, Runtime


@runtime_checkable
class UnitNames(Protocol):
    """A backend that names something after the agent's id (the systemd runtime's units)."""

    def id_refusals(self, agent_id: str) -> list[tuple[str, str]]:
        """(field, why) when the id cannot be used there (too long a unit name, taken)."""


# The backend of each runtime kind, or one Runtime alone (the process runtime).
Backends = Runtime | Mapping[RuntimeKind, Runtime]
# Why a kind has no backend.
UnavailableKinds = Mapping[RuntimeKind, str]


class RuntimeRouter:
    def __init__(
        self,
        backends: Mapping[RuntimeKind, Runtime],
        spec_of: Callable[[str], AgentSpec | None],
        unavailable: Mapping[RuntimeKind, str] | None = None,
    ) -> None:
        """spec_of: the agent's current spec (None for an unknown agent); unavailable: why a
        kind without a backend has none."""
        self._backends = dict(backends)
        self._spec_of = spec_of
        self._unavailable = dict(unavailable or {})
        # The backend running (or that last ran) each agent's process in this daemon's life.
        self._owner: dict[str, RuntimeKind] = {}

    @classmethod
    def of(
        cls,
        runtime: Backends,
        spec_of: Callable[[str], AgentSpec | None],
        unavailable: UnavailableKinds | None = None,
    ) -> RuntimeRouter:
        """The router of the backends of each kind; one Runtime alone is the process runtime."""
        backends = runtime if isinstance(runtime, Mapping) else {RuntimeKind.PROCESS: runtime}
        return cls(backends, spec_of, unavailable)

    def _why_not(self, kind: RuntimeKind) -> str:
        why = self._unavailable.get(kind, "this opmasd has no backend for it")
        return f"the {kind.value} runtime is not available: {why}"

    def spec_refusals(self, spec: AgentSpec, agent_id: str = "") -> list[tuple[str, str]]:
        """(field, why) for what of the spec's runtime and limits cannot be enforced, and (with
        agent_id) whether the runtime can run an agent of that id."""
        backend = self._backends.get(spec.runtime)
        if backend is None:
            return [("runtime", self._why_not(spec.runtime))]
        refused = identity_refusals(spec) + privilege_refusals(spec) + backend.refusals(spec.resources)
        if agent_id and isinstance(backend, UnitNames):
            refused += backend.id_refusals(agent_id)
        return refused

    def check_spec(self, spec: AgentSpec, field: str = "spec.", agent_id: str = "") -> None:
        """InvalidArgument naming each of the spec's runtime and limits that cannot be enforced
        (fields prefixed by `field`), and the id when its runtime cannot run it."""
        refused = self.spec_refusals(spec, agent_id)
        if refused:
            raise InvalidArgument([FieldViolation(f"{field}{name}", why) for name, why in refused])

    def _kind(self, agent_id: str) -> RuntimeKind:
        owner = self._owner.get(agent_id)
        if owner is not None:
            return owner
        spec = self._spec_of(agent_id)
        return RuntimeKind.PROCESS if spec is None else spec.runtime

    def _backend(self, agent_id: str) -> Runtime | None:
        return self._backends.get(self._kind(agent_id))

    # -- the Runtime protocol ----------------------------------------------------------------

    def set_exit_handler(self, handler: ExitHandler) -> None:
        for backend in self._backends.values():
            backend.set_exit_handler(handler)

    def refusals(self, resources: ResourceLimits) -> list[tuple[str, str]]:
        """What the process runtime (the default) cannot enforce; see spec_refusals."""
        backend = self._backends.get(RuntimeKind.PROCESS)
        return [] if backend is None else backend.refusals(resources)

    async def launch(self, request: LaunchRequest) -> ProcessHandle:
        spec = self._spec_of(request.agent_id)
        kind = RuntimeKind.PROCESS if spec is None else spec.runtime
        backend = self._backends.get(kind)
        if backend is None:
            raise LaunchError(self._why_not(kind))
        handle = await backend.launch(request)
        self._owner[request.agent_id] = kind
        return handle

    async def terminate(self, agent_id: str, timeout: float) -> None:
        backend = self._backend(agent_id)
        if backend is not None:
            await backend.terminate(agent_id, timeout)

    def begin_terminate(self, agent_id: str) -> None:
        backend = self._backend(agent_id)
        if backend is not None:
            backend.begin_terminate(agent_id)

    def adopt(self, agent_id: str, handle: ProcessHandle | None) -> ProcessHandle | None:
        """The spec's backend first, then the others: a spec changed while its process ran
        (the change applies at the next start) leaves the process with its old backend."""
        first = self._kind(agent_id)
        for kind in sorted(self._backends, key=lambda k: k != first):
            adopted = self._backends[kind].adopt(agent_id, handle)
            if adopted is not None:
                self._owner[agent_id] = kind
                return adopted
        return None

    async def reap_unmanaged(self) -> list[str]:
        reports: list[str] = []
        for backend in self._backends.values():
            reports += await backend.reap_unmanaged()
        return reports

    def usage(self, agent_id: str) -> ProcessUsage | None:
        backend = self._backend(agent_id)
        return None if backend is None else backend.usage(agent_id)

    async def tail_logs(self, agent_id: str, lines: int) -> list[LogEntry]:
        backend = self._backend(agent_id)
        return [] if backend is None else await backend.tail_logs(agent_id, lines)

    def follow_logs(self, agent_id: str) -> AsyncIterator[LogEntry]:
        backend = self._backend(agent_id)
        return _nothing() if backend is None else backend.follow_logs(agent_id)

    async def rotate_logs(self) -> None:
        for backend in self._backends.values():
            await backend.rotate_logs()

    async def aclose(self) -> None:
        for backend in self._backends.values():
            await backend.aclose()


async def _nothing() -> AsyncIterator[LogEntry]:
    return
    yield  # an async generator that ends at once
