"""Where desired and observed agent state is kept: base.AgentStore, sql.SqlStore."""
