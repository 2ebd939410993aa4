"""Built-in engines (the native engine lands with the engine issue)."""
