"""The NATS side of opmasd: connection, embedded server, subjects, JSON codecs, intake."""
