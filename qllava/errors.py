"""The one exception type that reaches users as a message instead of a traceback."""


class QllavaError(Exception):
    """A foreseeable user mistake (bad recipe, missing file, bad sample).

    The CLI prints the message to stderr and exits non-zero; the message must say what is
    wrong and, where it can, what to do about it.
    """
