"""The API edge: the gRPC AgentService and the NATS manager API over the manager; wire types stop here.

Each entry point converts its requests to domain values, calls the manager (its curated surface,
opmasd.manager) and converts the answer back; errors map to status codes in api/errors.py.
"""
