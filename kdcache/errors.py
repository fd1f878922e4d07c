"""The one exception type the CLI turns into a clean one-line error, and how any message is made safe to show."""


class KDCacheError(Exception):
    """Bad input or state the user can fix; the message says what and how."""


def printable(text: object) -> str:
    """Text safe to print on a terminal: control characters (escape sequences, newlines) shown escaped, since
    messages quote paths and cache attributes that a stranger may have written."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
