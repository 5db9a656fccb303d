"""Errors that reach the user as one line and exit code 2."""


class UserError(Exception):
    """Bad input or an unrecoverable run condition the user can fix.

    The CLI prints ``error: <message>`` on one line and exits with code 2.
    Messages say what is wrong and how to fix it.
    """

    exit_code = 2
