"""opmasd: the OPMAS agent manager daemon."""

__version__ = "0.1.0"
