"""The API edge: gRPC (and, from the same proto, REST). Wire types stop here."""
