"""Agent packages on disk: finding them (scan) and reading their agent.yaml (manifest)."""
