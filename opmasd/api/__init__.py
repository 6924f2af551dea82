"""The API edge: gRPC, REST (transcoded from the same proto) and the NATS manager API; wire types stop here.

Each entry point converts its requests to domain values, calls the manager (its curated surface,
opmasd.manager) and converts the answer back; errors map to status codes in api/errors.py.
Metrics and readiness for operators (/metrics, /readyz, gRPC health) live here too.
"""
