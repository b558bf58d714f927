"""Errors about a user's data, reported by `kiln` as one line naming the URL or key."""


class DataError(ValueError):
    """Shards that are missing, unreadable or malformed."""
