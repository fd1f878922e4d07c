"""The one exception type the CLI turns into a clean one-line error."""


class KDCacheError(Exception):
    """Bad input or state the user can fix; the message says what and how."""
