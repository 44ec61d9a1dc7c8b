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
    """Serve optuna-dashboard until Ctrl-C or SIGTERM, then return (a clean stop).

    The server runs in a thread of its own; the signals only set an event the calling
    thread waits on, so a signal never lands inside the server's or threading's own code
    (where an exception could leave a lock held and the process unable to finish)."""
    app = make_dashboard_app(storage_url)
    server = make_server(app, host, port)
    url = dashboard_url(host, server.server_address[1])
    stop = threading.Event()
    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, frame: stop.set())
    failed: list[BaseException] = []

    def serve() -> None:
        try:
            server.serve_forever(poll_interval=0.2)
        except BaseException as exc:  # raised again in the calling thread, below
            failed.append(exc)

    serving = threading.Thread(target=serve, daemon=True)
    try:
        serving.start()
        if on_ready is not None:
            on_ready(url)
        while serving.is_alive() and not stop.wait(0.2):
            pass
        if failed:
            raise failed[0]
        log.debug("dashboard: stopping")
    finally:
        # shutdown() waits for the serving loop's next poll; a stuck loop (a daemon
        # thread) is not waited on for long.
        stopping = threading.Thread(target=server.shutdown, daemon=True)
        stopping.start()
        stopping.join(STOP_SECONDS)
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)


STOP_SECONDS = 2.0
