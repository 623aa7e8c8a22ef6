"""Errors a user can fix. The CLI prints them as one line; the server maps them to OpenAI-style JSON (400)."""


class FractalError(ValueError):
    """Bad input or configuration: the message names the value at fault and what would be valid."""
