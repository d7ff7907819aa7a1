"""Errors shared by several kivfm modules (kept here so no module imports another for a type)."""


class ConfigError(ValueError):
  """A config value that cannot work; the message names the key and what is allowed."""


class DataUnavailableError(RuntimeError):
  """A dataset that is missing or not prepared; the message carries the command that fixes it."""
