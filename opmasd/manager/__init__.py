"""The manager layer: desired state, operations, supervision, discovery and health of agents.

What the layers above (api, app) use is exported here; the modules behind it are the
manager's own business.
"""

from opmasd.manager.audit import AuditTrail
from opmasd.manager.bulk import BulkOutcome, Selection
from opmasd.manager.events import AgentEvent, Subscription
from opmasd.manager.heartbeats import HealthSettings
from opmasd.manager.operations import AgentManager
from opmasd.manager.restart import RestartSettings
from opmasd.manager.settings import ManagerSettings
from opmasd.manager.stats import Durations, ManagerStats
from opmasd.manager.tokens import TokenKeeper
from opmasd.manager.values import AgentFilter, DiscoveredAgent, DiscoveryReport, OperationResult

__all__ = [
    "AgentEvent",
    "AgentFilter",
    "AgentManager",
    "AuditTrail",
    "BulkOutcome",
    "DiscoveredAgent",
    "DiscoveryReport",
    "Durations",
    "HealthSettings",
    "ManagerSettings",
    "ManagerStats",
    "OperationResult",
    "RestartSettings",
    "Selection",
    "Subscription",
    "TokenKeeper",
]
