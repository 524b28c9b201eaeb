"""Prefect's temporary API server, started here rather than by Prefect's client, so that it ends
with the CLI that needs it.

Without PREFECT_API_URL, Prefect's client starts a uvicorn server in a subprocess at its first API
call and stops it from an `atexit` hook. A `tunepipe run` ended by SIGKILL, or by a SIGTERM that
Prefect re-sends to itself after marking the flow run crashed (it does: prefect.utilities.engine's
capture_sigterm), never runs that hook, and the server lived on, orphaned.
"""

from __future__ import annotations

from pipeline.process_reaper import end_with_this_process


def start_bound_to_this_process() -> str | None:
    """Start the temporary server now (when no API URL is configured) and have it stopped when
    this process ends, however it ends. Returns its API URL, or None when a server is configured."""
    from prefect.settings import get_current_settings

    if get_current_settings().api.url:
        return None
    from prefect.server.api.server import SubprocessASGIServer

    # The instance Prefect's client takes at its first call (keyed by port None): started here, it
    # is reused there, not started twice.
    server = SubprocessASGIServer()
    server.start()
    end_with_this_process(server.server_process.pid)
    return server.api_url
