"""One exception type for every data problem, so CLIs can print one clear line."""


class DataError(ValueError):
    """Input data is unusable; the message names the problem (file, key, shape, value)."""
