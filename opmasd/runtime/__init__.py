"""How an agent runs: one interface (base.Runtime), one backend per module."""
