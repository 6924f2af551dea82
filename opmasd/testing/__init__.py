"""In-memory implementations of the manager's interfaces, for fast tests of the logic above them."""
