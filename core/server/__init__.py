"""q's OpenAI-compatible server (``q serve``). Imported only by the serve command: it needs
the ``[serve]`` extra (fastapi, uvicorn, prometheus-client)."""
