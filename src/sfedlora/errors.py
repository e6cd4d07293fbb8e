"""The one exception type the CLI turns into a one-line message and exit code 2."""


class SfedloraError(Exception):
    """A problem with the user's input (config, data, model path, run directory)."""
