"""Exceptions that the command line turns into exit status 2."""


class UsageError(ValueError):
    """Invalid input from the user: a bad option value, a missing file or a corrupt checkpoint.

    The message names the value and the fix; ``crsam`` prints it on one line and exits with 2.
    """
