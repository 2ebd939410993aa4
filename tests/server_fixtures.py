"""Real uvicorn servers on 127.0.0.1 (a free port) in a background thread, for tests."""

from __future__ import annotations

import contextlib
import threading
import time


@contextlib.contextmanager
def running_app(app):
    """Any ASGI app under uvicorn on 127.0.0.1 (a free port) in a background thread."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not (server.started and server.servers):
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def running_server(session, **settings):
    """q's OpenAI app over ``session``; yields (base URL, app)."""
    from q.server.app import ServerSettings, create_app

    settings.setdefault("model_name", "m")
    app = create_app(session, ServerSettings(**settings))
    try:
        with running_app(app) as url:
            yield url, app
    finally:
        app.state.engine_loop.close()
