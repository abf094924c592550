"""The one error type a user can cause; its message says what to do."""


class LongDocError(Exception):
    """Bad input, an unsupported model or an impossible configuration.

    The CLI prints the message on one line and exits with code 2; library users catch this type.
    """
