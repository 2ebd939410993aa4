"""The five hooks q offers. Each takes a ``register`` callback; behaviour lives on objects.

Impls may accept fewer arguments than a spec (pluggy's opt-in arguments), so specs only ever
gain parameters. Call order between plugins never matters: registries reject duplicates.
"""

import pluggy

PROJECT = "q"
ENTRY_POINT_GROUP = "q.plugins"
ENV_LOAD_PLUGINS = "Q_LOAD_PLUGINS"
ENV_TRACE_PLUGINS = "Q_TRACE_PLUGINS"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

# --- what a model can be turned into ---------------------------------------------------


@hookspec
def register_schemes(register):
    """Register quantization schemes: ``register(scheme, aliases=())``.

    Called once per registry build. ``scheme`` is a :class:`q.interfaces.Scheme` instance.
    """


@hookspec
def register_formats(register):
    """Register checkpoint formats: ``register(format, aliases=())``.

    Called once per registry build. ``format`` is a :class:`q.interfaces.Format` instance.
    """


@hookspec
def register_engines(register):
    """Register inference engines: ``register(engine, aliases=())``.

    Called once per registry build. ``engine`` is a :class:`q.interfaces.Engine` instance.
    """


# --- how users reach it -------------------------------------------------------------------


@hookspec
def register_commands(cli):
    """Add click commands to the ``q`` command group ``cli`` (``@cli.command()``).

    Called once when the CLI is built, after the built-in commands.
    """


@hookspec
def register_routes(register):
    """Register HTTP routes for ``q serve``: ``register(router)`` with a FastAPI APIRouter.

    Called once per server app built.
    """
