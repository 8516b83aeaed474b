"""The one exception type for problems a user must fix, and how the programs print it."""


class UserError(Exception):
    """A wrong flag, a missing or broken file, a checkpoint that does not fit, a diverged run: the programs print
    the message as one line (``error: ...``) instead of a traceback. Messages name the flag, file or key at fault."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line. An exception re-raised from a DataLoader worker carries the worker's
    traceback: keep its last line, the worker's own message."""
    message = str(error).strip()
    if "Original Traceback" in message:
        last = [line for line in message.splitlines() if line.strip()][-1]
        message = last.split(": ", 1)[1] if ": " in last else last
    lines = message.splitlines()
    return lines[0].strip() if lines else type(error).__name__
