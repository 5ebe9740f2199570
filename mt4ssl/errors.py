"""The one exception type for bad user input.

Anything the user can fix (a file, a line, a config key) raises `InputError` with a message
naming the place and what is wrong; the CLI prints it without a stack trace.
"""


class InputError(Exception):
    """Bad input: the message names the file/line/key and what is wrong."""
