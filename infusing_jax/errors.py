"""The user's mistakes, as one typed error.

    raise UserError("config.data.resize: must be >= model.image_size (32), got 16")

A UserError says what input is wrong and what to do: `<field or file>: <what to
do>`. Config validation, data and checkpoint loading and the commands raise it;
every command prints it as one line, `error: <message>`, and exits 1
(infusing_jax/cli.py). Any other exception is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Bad input from the user: a config field, a flag or a file. One line, no traceback."""
