"""The version, defined once: pyproject.toml reads it (``[tool.setuptools.dynamic]``), everything else imports it."""

__version__ = "0.1.0"
