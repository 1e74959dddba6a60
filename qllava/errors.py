"""The one exception type that reaches users as a message instead of a traceback."""


class QllavaError(Exception):
    """A foreseeable user mistake (bad recipe, missing file, bad sample).

    The CLI prints the message to stderr and exits non-zero; the message must say what is
    wrong and, where it can, what to do about it.
    """


def problem_list(problems: list[str], limit: int = 20) -> str:
    """Problems as an indented list for one error message, the first `limit` of them."""
    shown = "\n".join(f"  - {p}" for p in problems[:limit])
    return shown + (f"\n  ... and {len(problems) - limit} more" if len(problems) > limit else "")
