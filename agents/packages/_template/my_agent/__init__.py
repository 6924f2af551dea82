"""my-agent: replace with what this agent watches and reports."""
