"""The one error type of config validation, apart from config.py so that the checks config.py
calls (lora_checks.py, ...) can raise it without importing config.py back."""


class ConfigError(ValueError):
    """A config value is invalid. The message names the field and the value."""
