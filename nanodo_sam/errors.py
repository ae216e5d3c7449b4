"""The error every module raises for bad user input.

`UsageError` is reported by the CLI as one line (what is wrong, how to fix
it) and exit code 2, before any work. A leaf module, so that every other
module can raise it without importing the loader or the validators.
"""


class UsageError(ValueError):
  """Bad input: reported as one line and exit code 2 by the CLI."""


def one_line(e: Exception) -> str:
  """An exception as one line: type, message, and for a syntax error where."""
  if isinstance(e, SyntaxError):
    return f"SyntaxError: {e.msg} (line {e.lineno})"
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}" if text else type(e).__name__
