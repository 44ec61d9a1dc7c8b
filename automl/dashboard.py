"""optuna-dashboard on the study storage: a WSGI server that stops cleanly on Ctrl-C."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from automl.errors import StorageError, UsageError

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

log = logging.getLogger(__name__)

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def is_local(host: str) -> bool:
    """Whether only this machine can reach ``host`` (the dashboard has no login)."""
    return host in LOCAL_HOSTS or host.startswith("127.")


def dashboard_url(host: str, port: int) -> str:
    """The address to open in a browser."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0") else host
    if ":" in shown and not shown.startswith("["):
        shown = f"[{shown}]"  # IPv6
    return f"http://{shown}:{port}/dashboard/"


def make_dashboard_app(storage_url: str) -> Callable[..., Any]:
    """optuna-dashboard's WSGI app on an existing storage (never creates one)."""
    try:
        import optuna_dashboard
    except ImportError:
        raise UsageError(
            "optuna-dashboard is not installed; pip install 'automl[dashboard]'"
        ) from None
    from automl.storage import open_storage

    storage = open_storage(storage_url, create=False)
    return optuna_dashboard.wsgi(storage)


def make_server(app: Callable[..., Any], host: str, port: int) -> WSGIServer:
    """A threaded wsgiref server whose request log goes to debug logging, not stderr."""
    import socket
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer
    from wsgiref.simple_server import make_server as _make

    class _Quiet(WSGIRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            log.debug("dashboard: " + format, *args)

    class _Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    try:
        return _make(host, port, app, server_class=_Server, handler_class=_Quiet)
    except OSError as exc:
        if exc.errno in (98, 48):  # EADDRINUSE on Linux, macOS
            raise UsageError(f"port {port} on {host} is in use; pick another with --port") from None
        raise StorageError(
            f"cannot listen on {host}:{port}: {exc.strerror}", bad_input=True
        ) from None


def serve_dashboard(
    storage_url: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    on_ready: Callable[[str], None] | None = None,
) -> None:
    """Serve optuna-dashboard until Ctrl-C or SIGTERM, then return (a clean stop)."""
    app = make_dashboard_app(storage_url)
    server = make_server(app, host, port)
    url = dashboard_url(host, server.server_address[1])
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        if on_ready is not None:
            on_ready(url)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        log.debug("dashboard: stopping")
    finally:
        server.server_close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
