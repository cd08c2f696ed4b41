class CnnpipeError(Exception):
    """An error the user can act on; the CLI prints it as one line."""
