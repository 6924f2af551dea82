"""How an agent runs: one interface (base.Runtime), the process backend and the parts it uses."""
