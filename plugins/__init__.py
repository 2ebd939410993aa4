"""q's built-in plugins. Each module is registered by its own entry point in pyproject.toml,
exactly like a third-party plugin; nothing imports them all."""
