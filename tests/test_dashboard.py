"""`automl dashboard`: the real optuna-dashboard, served from a real process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import optuna
import pytest
from browser import CHROMIUM, run_chromium
from typer.testing import CliRunner

from automl.cli import app
from automl.dashboard import dashboard_url, is_local
from automl.workers import automl_command

runner = CliRunner()
DEADLINE = 60.0  # seconds for a loaded machine to start Python, optuna and the server


def make_study(url: str, name: str = "dash-study") -> None:
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_metric_names(["val_accuracy"])
    study.set_user_attr("space", "name: dash-study\ndata: {dataset: iris}\n")
    for i in range(3):
        trial = study.ask()
        x = trial.suggest_float("lr", 1e-4, 1e-1, log=True)
        for epoch in range(3):
            trial.report(0.3 + 0.1 * epoch + x, epoch)
        trial.set_user_attr("val_loss", 1.0 - x)
        study.tell(trial, 0.5 + x + i / 100)


class Served:
    """A running `automl dashboard` process and the URL it printed."""

    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc = proc
        self.url = url
        self.base = url.removesuffix("/dashboard/")

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(self.base + path, timeout=10) as response:
            return json.loads(response.read())


@pytest.fixture
def served(storage_url: str) -> Iterator[Served]:
    make_study(storage_url)
    # A dashboard that does not stop dumps every thread's stack on SIGABRT (see _stopped).
    env = {**os.environ, "COLUMNS": "200", "PYTHONFAULTHANDLER": "1"}
    proc = subprocess.Popen(
        [*automl_command(), "dashboard", "--storage", storage_url, "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(DEADLINE)
    if not lines or "http://" not in lines[0]:
        proc.kill()
        _, err = proc.communicate()
        pytest.fail(f"the dashboard printed no URL: {lines!r} {err!r}")
    url = lines[0].split(" at ", 1)[1].split()[0]
    try:
        yield Served(proc, url)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def test_dashboard_serves_the_study_and_stops_cleanly_on_ctrl_c(
    served: Served, storage_url: str
) -> None:
    assert served.url.startswith("http://127.0.0.1:") and served.url.endswith("/dashboard/")
    deadline = time.monotonic() + DEADLINE
    studies: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            studies = served.get("/api/studies")["study_summaries"]
            break
        except OSError:
            time.sleep(0.2)
    assert [s["study_name"] for s in studies] == ["dash-study"]
    detail = served.get(f"/api/studies/{studies[0]['study_id']}")
    assert detail["objective_names"] == ["val_accuracy"]
    assert {"key": "space", "value": "name: dash-study\ndata: {dataset: iris}\n"} in detail[
        "user_attrs"
    ]
    assert len(detail["trials"]) == 3
    assert len(detail["trials"][0]["intermediate_values"]) == 3
    served.proc.send_signal(signal.SIGINT)
    err = _stopped(served.proc)
    assert served.proc.returncode == 0, err
    assert "dashboard stopped" in err
    assert "Traceback" not in err
    assert "Warning" not in err  # Optuna's experimental warnings are not the user's business


def _stopped(proc: subprocess.Popen[str]) -> str:
    """The stderr of a dashboard that was told to stop; if it does not stop in time, a
    failure showing where each of its threads is."""
    try:
        _, err = proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=DEADLINE)
        pytest.fail(f"the dashboard did not stop within {DEADLINE} s:\n{err[-6000:]}")
    return err


@pytest.mark.slow
def test_dashboard_stops_cleanly_on_sigterm(served: Served) -> None:
    served.proc.terminate()
    err = _stopped(served.proc)
    assert served.proc.returncode == 0, err
    assert "dashboard stopped" in err


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_dashboard_page_renders_in_a_real_browser(served: Served) -> None:
    result = run_chromium("--dump-dom", served.url, budget_ms=15000)
    dom = result.stdout
    assert "<title>Optuna Dashboard</title>" in dom
    # the study's name is only in the DOM once the app has run and fetched /api/studies
    assert "dash-study" in dom
    assert "MAXIMIZE" in dom.upper()


def test_binding_beyond_loopback_warns(storage_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    make_study(storage_url)
    calls: list[dict[str, Any]] = []

    def fake_serve(url: str, **kwargs: Any) -> None:
        calls.append({"url": url, **kwargs})
        kwargs["on_ready"](dashboard_url(kwargs["host"], kwargs["port"]))

    monkeypatch.setattr("automl.dashboard.serve_dashboard", fake_serve)
    wide = runner.invoke(
        app, ["dashboard", "--storage", storage_url, "--host", "0.0.0.0", "--port", "9999"]
    )
    assert wide.exit_code == 0, wide.stderr
    assert "no authentication" in wide.stderr
    assert calls[-1]["host"] == "0.0.0.0" and calls[-1]["port"] == 9999
    local = runner.invoke(app, ["dashboard", "--storage", storage_url])
    assert local.exit_code == 0
    assert "no authentication" not in local.stderr
    assert calls[-1]["host"] == "127.0.0.1" and calls[-1]["port"] == 8080
    assert "http://127.0.0.1:8080/dashboard/" in local.stdout


@pytest.mark.parametrize(
    ("host", "local"),
    [
        ("127.0.0.1", True),
        ("localhost", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("10.1.2.3", False),
    ],
)
def test_is_local(host: str, local: bool) -> None:
    assert is_local(host) is local


def test_dashboard_url_for_ipv6_and_any_address() -> None:
    assert dashboard_url("::1", 8080) == "http://[::1]:8080/dashboard/"
    assert dashboard_url("0.0.0.0", 80) == "http://127.0.0.1:80/dashboard/"


def test_dashboard_on_a_missing_storage_is_bad_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["dashboard", "--storage", f"sqlite:///{tmp_path / 'no.db'}"])
    assert result.exit_code == 2
    assert "run a study first" in result.stderr
    assert not (tmp_path / "no.db").exists()


def test_dashboard_on_a_busy_port_is_bad_input(storage_url: str) -> None:
    make_study(storage_url)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = runner.invoke(app, ["dashboard", "--storage", storage_url, "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr


def test_a_server_that_fails_is_an_error_not_a_silent_stop(
    storage_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from automl import dashboard

    make_study(storage_url)

    def broken(self: Any, poll_interval: float = 0.5) -> None:
        raise OSError("the listening socket went away")

    monkeypatch.setattr("socketserver.BaseServer.serve_forever", broken)
    with pytest.raises(OSError, match="listening socket went away"):
        dashboard.serve_dashboard(storage_url, port=0)
