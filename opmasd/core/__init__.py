"""The bottom layer: the domain model, messages, errors, ids and clock every other layer uses.

Nothing here imports anything else from opmasd, so any layer may depend on it and it on none.
"""
