"""The command line: a thin Typer shell over the library. Parsing, rendering, exit codes."""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Optional, TypeVar

import typer
from typer._click.exceptions import NoArgsIsHelpError  # typer vendors click
from typer._click.exceptions import UsageError as ClickUsageError
from typer.core import TyperGroup

from automl.errors import AutomlError, UsageError

if TYPE_CHECKING:
    from rich.console import Console

    from automl.spaces import Space


class _OneLineUsageGroup(TyperGroup):
    """Click prints a usage error as usage, hint and message over three lines; the
    contract is one ``error:`` line (exit 2), like every other bad input."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except ClickUsageError as exc:
            raise _one_line(exc) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ClickUsageError as exc:
            raise _one_line(exc) from None


def _one_line(exc: ClickUsageError) -> ClickUsageError:
    if isinstance(exc, NoArgsIsHelpError):
        return exc  # `automl` alone prints the help, as it should

    def show(file: Any = None) -> None:
        from rich.markup import escape

        hint = f"; see '{exc.ctx.command_path} --help'" if exc.ctx is not None else ""
        message = escape(exc.format_message().replace("\n", " ").rstrip("."))
        _stderr().print(f"[red]error:[/red] {message}{hint}", markup=True, soft_wrap=True)

    exc.show = show  # type: ignore[method-assign]
    return exc


app = typer.Typer(
    cls=_OneLineUsageGroup,
    name="automl",
    help="Hyperparameter search for PyTorch models, from a YAML space file, on Optuna.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
space_app = typer.Typer(help="Check, show and create space files.", no_args_is_help=True)
app.add_typer(space_app, name="space")

log = logging.getLogger("automl")

_STATE: dict[str, Any] = {"debug": False}

StorageOpt = Annotated[
    Optional[str],
    typer.Option(
        "--storage",
        help="Optuna storage URL (else $AUTOML_STORAGE, else sqlite:///studies/automl.db).",
        show_default=False,
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout.")]

F = TypeVar("F", bound=Callable[..., Any])


def _stderr() -> Console:
    from rich.console import Console

    # No markup or emoji codes unless a call asks: study names, paths and failure
    # reasons are printed as typed ('exp [/v2]' is not a closing tag, ':x:' no emoji).
    return Console(stderr=True, highlight=False, markup=False, emoji=False)


def _stdout() -> Console:
    from rich.console import Console

    return Console(highlight=False, markup=False, emoji=False)


class _PlainHandler(logging.Handler):
    """``LEVEL    message``, one line per record, to whatever ``sys.stderr`` is now: what a
    cron log or a pipe gets (Rich would wrap a long line at 80 columns and pad it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"{record.levelname:<8} {self.format(record)}\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


def _setup_logging(*, debug: bool) -> None:
    handler: logging.Handler
    if sys.stderr.isatty():
        from rich.logging import RichHandler

        handler = RichHandler(console=_stderr(), show_time=False, show_path=False, markup=False)
    else:
        handler = _PlainHandler()
    handler.addFilter(_mask_record)
    root = logging.getLogger("automl")
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    root.propagate = False
    import threading

    threading.excepthook = _thread_failed
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.DEBUG if debug else optuna.logging.ERROR)
    except ImportError:  # pragma: no cover
        pass


def _mask_record(record: logging.LogRecord) -> bool:
    """No password in a storage URL reaches the log, whatever module logged it."""
    import contextlib

    from automl.storage import mask_url

    with contextlib.suppress(Exception):  # a malformed call: logging reports it as usual
        record.msg, record.args = mask_url(record.getMessage()), None
    return True


def _thread_failed(args: Any) -> None:
    """A background thread's error (Optuna's heartbeat writer when the storage goes away)
    is one warning line, not a traceback; the main thread reports what it means."""
    from automl.storage import root_cause

    log.warning(
        "background thread %s stopped: %s",
        getattr(args.thread, "name", "thread"),
        root_cause(args.exc_value),
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback) if _STATE["debug"] else None,
    )


def _write_text(path: Path, text: str) -> None:
    """Write an output file the user named; a path that cannot be written is one line."""
    from automl.errors import AutomlError

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    except OSError as exc:
        raise AutomlError(f"cannot write {path}: {exc.strerror}") from None


def _check_output(output: Path, study: Any, storage: str | None) -> None:
    """Refuse (before any work) an output file that the study lives on or came from."""
    from automl.outputs import refuse_overwrite, study_files

    refuse_overwrite(output, study_files(study, storage))


def _fail(message: str, code: int) -> typer.Exit:
    from rich.markup import escape

    from automl.storage import mask_url

    # escape: a message quoting user text ("data.drop: [b]") is not Rich markup.
    _stderr().print(f"[red]error:[/red] {escape(mask_url(message))}", markup=True, soft_wrap=True)
    return typer.Exit(code)


def handle_errors(func: F) -> F:
    """Turn library errors into one red line and the contract's exit code."""
    import functools

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except AutomlError as exc:
            if _STATE["debug"]:
                raise
            raise _fail(str(exc), exc.exit_code) from None
        except typer.Exit:
            raise
        except KeyboardInterrupt:
            _stderr().print("interrupted")
            raise typer.Exit(130) from None
        except Exception as exc:
            if _STATE["debug"]:
                raise
            raise _fail(_explain(exc), 1) from None

    return wrapper  # type: ignore[return-value]


def _explain(exc: Exception) -> str:
    """One line for an error no automl code turned into one: what the storage's own
    errors mean where they are known, else the type and first line."""
    if isinstance(exc, KeyError) and exc.args == ("Record does not exist.",):
        return (
            "the study or one of its trials is no longer in the storage (deleted by another "
            "process during this command?); nothing more was written"
        )
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if type(exc).__name__ == "_InactiveRpcError" and callable(code) and callable(details):
        return (
            f"the gRPC storage proxy stopped answering ({getattr(code(), 'name', code())}: "
            f"{details()}); is `automl proxy` still running?"
        )
    first = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {first} (run with --debug for the traceback)"


@app.callback()
def main(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks and debug logs.")] = False,
) -> None:
    """automl: find the optimizer, loss, learning rate, batch size and units for a model."""
    _STATE["debug"] = debug
    _setup_logging(debug=debug)


# --------------------------------------------------------------------------- run


def _space_from_args(
    space_file: Path | None,
    *,
    dataset: str | None,
    data: Path | None,
    target: str | None,
    model: str | None,
    objective: str | None,
    epochs: int | None,
    optimizer: str | None,
    loss: str | None,
    lr: str | None,
    batch_size: str | None,
    hidden_units: str | None,
    params: list[str],
) -> Space:
    from automl import spaces

    flags: dict[str, Any] = {"data": {}, "space": {}}
    if dataset is not None:
        flags["data"]["dataset"] = dataset
    if data is not None:
        flags["data"]["path"] = str(data)
    if target is not None:
        flags["data"]["target"] = target
    flags["model"] = model
    if objective is not None:
        flags["objective"] = objective.split(",") if "," in objective else objective
    flags["epochs"] = epochs
    for name, value in (
        ("optimizer", optimizer),
        ("loss", loss),
        ("lr", lr),
        ("batch_size", batch_size),
        ("hidden_units", hidden_units),
    ):
        if value is not None:
            flags["space"][name] = spaces.parse_spec(value, where=f"--{name.replace('_', '-')}")
    for item in params:
        name, eq, spec = item.partition("=")
        if not eq or not name.strip():
            raise UsageError(f"--param {item!r}: use NAME=SPEC, e.g. --param dropout=0..0.5")
        if name.strip() in flags["space"]:  # as a key given twice in a space file
            raise UsageError(
                f"--param {name.strip()}: given twice (or with its own flag); keep one"
            )
        flags["space"][name.strip()] = spaces.parse_spec(spec, where=f"--param {name.strip()}")
    has_flags = any(v for k, v in flags.items() if k in ("data", "space")) or any(
        flags.get(k) is not None for k in ("model", "objective", "epochs")
    )
    if space_file is None:
        if not flags["data"]:
            raise UsageError(
                "give a space file (automl run SPACE) or the data with --dataset NAME "
                "or --data FILE --target COL"
            )
        raw = spaces.merge_flags(None, flags)
        import yaml

        source = yaml.safe_dump(raw, sort_keys=False)
        return spaces.parse_space(raw, file="(flags)", source=source)
    loaded = spaces.load_space(space_file)
    if not has_flags:
        return loaded
    raw = spaces.merge_flags(loaded.to_dict(), flags)
    import yaml

    source = yaml.safe_dump(raw, sort_keys=False)
    parsed = spaces.parse_space(raw, file=str(space_file), source=source)
    from dataclasses import replace

    # A data path from the file stays relative to the file, as in load_space.
    parsed = spaces._with_path(parsed, str(space_file))
    return replace(parsed, name=parsed.name or Path(space_file).stem)


@app.command()
@handle_errors
def run(
    ctx: typer.Context,
    space_file: Annotated[
        Optional[Path], typer.Argument(metavar="[SPACE]", help="The space file (YAML).")
    ] = None,
    study: Annotated[Optional[str], typer.Option("--study", help="Study name.")] = None,
    storage: StorageOpt = None,
    n_trials: Annotated[
        Optional[int], typer.Option("--n-trials", min=1, help="Run N more trials (default 20).")
    ] = None,
    until: Annotated[
        Optional[int],
        typer.Option("--until", min=1, help="Run until the study holds N finished trials."),
    ] = None,
    timeout: Annotated[
        Optional[float],
        typer.Option("--timeout", min=0.0, help="Stop starting new trials after SECONDS."),
    ] = None,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")
    ] = "auto",
    seed: Annotated[
        Optional[int],
        typer.Option("--seed", min=0, max=2**32 - 1, help="Seed for sampler and trials."),
    ] = None,
    max_failures: Annotated[
        int,
        typer.Option("--max-failures", min=0, help="Stop after N trials in a row fail (0: never)."),
    ] = 5,
    allow_space_change: Annotated[
        bool,
        typer.Option(
            "--allow-space-change",
            help="Go on when the space's objective or data differ from the study's.",
        ),
    ] = False,
    warm_start: Annotated[
        Optional[str],
        typer.Option(
            "--warm-start",
            metavar="OTHER_STUDY[:K]",
            help="First try the best K (default 5) configurations of another study.",
        ),
    ] = None,
    log_file: Annotated[
        Optional[Path],
        typer.Option(
            "--log-file", metavar="FILE", help="Append plain progress lines to FILE (for cron)."
        ),
    ] = None,
    as_json: JsonOpt = False,
    workers: Annotated[
        int,
        typer.Option("--workers", min=1, help="Worker processes on this machine (same study)."),
    ] = 1,
    pack: Annotated[
        int,
        typer.Option(
            "--pack",
            min=1,
            help=(
                "Train K trials at once: compatible ones as one fused model (small MLPs; "
                "on a GPU, 32 or more)."
            ),
        ),
    ] = 1,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="A bundled dataset.")] = None,
    data: Annotated[Optional[Path], typer.Option("--data", help="A CSV/Parquet/NPZ file.")] = None,
    target: Annotated[Optional[str], typer.Option("--target", help="Column to predict.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="mlp | cnn.")] = None,
    objective: Annotated[
        Optional[str], typer.Option("--objective", help="Metric, or a comma list.")
    ] = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Epochs.")] = None,
    optimizer: Annotated[
        Optional[str], typer.Option("--optimizer", help="e.g. adam,sgd,rmsprop")
    ] = None,
    loss: Annotated[Optional[str], typer.Option("--loss", help="e.g. cross_entropy,mse")] = None,
    lr: Annotated[Optional[str], typer.Option("--lr", help="e.g. 1e-5..1e-1:log")] = None,
    batch_size: Annotated[Optional[str], typer.Option("--batch-size", help="e.g. 16,32,64")] = None,
    hidden_units: Annotated[
        Optional[str], typer.Option("--hidden-units", help="e.g. 16..512:log")
    ] = None,
    param: Annotated[
        Optional[list[str]],
        typer.Option(
            "--param", help="NAME=SPEC for any name, e.g. dropout=0..0.5, sgd.momentum=0.9"
        ),
    ] = None,
) -> None:
    """Run a search: train real PyTorch models, one Optuna trial each."""
    from automl import spaces
    from automl.storage import mask_url, resolve_storage_url
    from automl.studies import RunOptions, run_study

    space = _space_from_args(
        space_file,
        dataset=dataset,
        data=data,
        target=target,
        model=model,
        objective=objective,
        epochs=epochs,
        optimizer=optimizer,
        loss=loss,
        lr=lr,
        batch_size=batch_size,
        hidden_units=hidden_units,
        params=param or [],
    )
    name = (
        spaces.study_name_for(space, study)
        if space.path or study is not None or space.name
        else (space.data.dataset or Path(space.data.path or "automl").stem)
    )
    url = resolve_storage_url(storage)
    options = RunOptions(
        study_name=name,
        storage_url=url,
        n_trials=n_trials,
        until=until,
        timeout=timeout,
        device=device,
        seed=seed,
        max_failures=max_failures,
        allow_space_change=allow_space_change,
        warm_start=warm_start,
        pack=pack,
    )
    exit_code = 0
    if workers > 1:
        from automl import workers as workers_mod

        workers_mod.prepare_study(space, name, url, seed=seed)
        # Space check and warm start once, here, rather than racing in every worker.
        from automl.lifecycle import check_stored_space, warm_start_from
        from automl.storage import open_storage
        from automl.studies import load_study

        check_stored_space(open_storage(url), space, name, allow=allow_space_change)
        if warm_start:
            warm_start_from(load_study(name, url), space, warm_start, url)
        # The parent splits the budget; the URL goes by environment (not visible in `ps`).
        worker_args = workers_mod.args_from_context(ctx, skip=workers_mod.PARENT_ONLY)
        result = workers_mod.run_workers(
            [*worker_args, "--study", name],
            n_workers=workers,
            study_name=name,
            storage_url=url,
            n_trials=n_trials,
            until=until,
            timeout=timeout,
            device=device,
            display=workers_mod.make_display(quiet=as_json, n_workers=workers),
        )
        summary, exit_code = result.summary, result.exit_code
    else:
        from automl.progress import TeeObserver, make_observer

        observer = make_observer(quiet=as_json, log_file=log_file)
        catcher = _SummaryCatcher()
        try:
            with observer:
                summary = run_study(space, options, TeeObserver(observer, catcher))
        except (AutomlError, KeyboardInterrupt) as exc:
            if as_json:
                # A run that fails (bad data, every trial failed, a signal, even before
                # its first trial) still writes its one JSON document: cron and scripts
                # read the counts and the reason.
                from automl.studies import RunSummary

                started = catcher.summary is not None  # (else the storage may not answer)
                done = catcher.summary or RunSummary(study_name=name, storage=mask_url(url))
                done.stop_reason = str(exc) or "interrupted"
                _print_json(_run_doc(name, url, done, load=started))
            raise
    from automl.studies import load_study

    study_obj = load_study(name, url)
    if as_json:
        doc = _run_doc(name, url, summary, study_obj)
        if workers > 1:
            doc["workers"] = [
                {"index": w.index, "exit_code": w.exit_code}
                | {k: v for k, v in (w.doc or {}).items() if k in _WORKER_KEYS}
                for w in result.workers
            ]
        _print_json(doc)
        if exit_code:
            raise typer.Exit(exit_code)
        return
    out = _stdout()
    out.print(
        f"{summary.stop_reason}: {summary.n_complete} complete, {summary.n_pruned} pruned, "
        f"{summary.n_failed} failed in {summary.seconds:.1f}s; study '{name}' in {mask_url(url)}",
        soft_wrap=True,
    )
    from automl.results import render_trials_table, top_trials

    if len(study_obj.directions) > 1:  # several objectives: the Pareto front, not a ranking
        front = sorted(study_obj.best_trials, key=lambda t: t.values[0])[:10]
        if front:
            render_trials_table(out, study_obj, front, title=f"Pareto front of '{name}'")
    else:
        trials = top_trials(study_obj, limit=5)
        if trials:
            render_trials_table(out, study_obj, trials, title=f"best trials of '{name}'")
    if exit_code:
        raise typer.Exit(exit_code)


@app.command()
@handle_errors
def proxy(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port.")] = 13000,
) -> None:
    """Serve the storage to many workers over gRPC; they use --storage grpc://HOST:PORT.

    No TLS and no authentication: run it on a private network only."""
    from automl.storage import resolve_storage_url
    from automl.workers import serve_proxy

    err = _stderr()
    serve_proxy(
        resolve_storage_url(storage),
        host=host,
        port=port,
        ready=lambda message: err.print(message, soft_wrap=True),
    )


_WORKER_KEYS = ("n_complete", "n_pruned", "n_failed", "stop_reason", "seconds")


class _SummaryCatcher:
    """An observer that keeps the run's summary (also of a run that raises)."""

    summary: Any = None

    def __enter__(self) -> _SummaryCatcher:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def run_finished(self, summary: Any) -> None:
        self.summary = summary


def _run_doc(
    name: str, url: str, summary: Any, study: Any = None, *, load: bool = True
) -> dict[str, Any]:
    """``run --json``'s document (``best`` from ``study``, else loaded when ``load``)."""
    from automl.results import best_summary
    from automl.storage import mask_url
    from automl.studies import load_study

    if study is None and load:
        try:
            study = load_study(name, url)
        except Exception:  # the storage itself failed: the counts still go out
            study = None
    return {
        "study": name,
        "storage": mask_url(url),
        "n_complete": summary.n_complete,
        "n_pruned": summary.n_pruned,
        "n_failed": summary.n_failed,
        "stop_reason": summary.stop_reason,
        "seconds": round(summary.seconds, 3),
        "best": best_summary(study) if study is not None else None,
    }


# --------------------------------------------------------------------------- reading


def _print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(_jsonable(doc), indent=2) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return value


@app.command()
@handle_errors
def studies(storage: StorageOpt = None, as_json: JsonOpt = False) -> None:
    """List the studies in the storage."""
    from automl.storage import mask_url, resolve_storage_url
    from automl.studies import list_studies

    rows = list_studies(storage)
    if as_json:
        _print_json(
            [
                {
                    "name": r.name,
                    "direction": r.directions[0] if len(r.directions) == 1 else None,
                    "directions": r.directions,
                    "n_trials": r.n_trials,
                    "n_complete": r.n_complete,
                    "best_value": r.best_value,
                    "created": r.created,
                }
                for r in rows
            ]
        )
        return
    from rich.table import Table

    from automl.results import format_value

    out = _stdout()
    if not rows:
        out.print(f"no studies in {mask_url(resolve_storage_url(storage))}")
        return
    table = Table(title=f"studies in {mask_url(resolve_storage_url(storage))}")
    # The name is what the other commands take: never cut; the date gives way first.
    longest = max(len(r.name) for r in rows)
    width = {
        "name": min(longest, 24),  # (room kept for the name before any column goes)
        "direction": 9,
        "trials": 6,
        "complete": 8,
        "best value": 10,
        "created": 16,
    }
    for dropped in ("created", "direction", "complete", "best value"):
        if sum(width.values()) + 3 * len(width) + 1 <= out.width:
            break
        del width[dropped]  # a narrow terminal: the name stays, the others give way
    rest = sum(w for col, w in width.items() if col != "name") + 3 * len(width) + 1
    width["name"] = max(4, min(longest, out.width - rest))
    for col, least in width.items():
        table.add_column(
            col,
            justify="right" if col in ("trials", "complete", "best value") else "left",
            no_wrap=col != "name",
            overflow="fold" if col == "name" else "ellipsis",  # a name is never cut
            min_width=least,
        )
    for r in rows:
        cells = {
            "name": r.name,
            "direction": ", ".join(r.directions),
            "trials": str(r.n_trials),
            "complete": str(r.n_complete),
            "best value": format_value(r.best_value),
            "created": (r.created or "").replace("T", " ")[:16],
        }
        table.add_row(*(cells[col] for col in width))
    out.print(table)


@app.command()
@handle_errors
def show(
    study: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Show at most N trials.")] = 20,
    state: Annotated[
        Optional[str],
        typer.Option("--state", help="Only trials in this state: complete, pruned, fail, running."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The study's trials, best first."""
    from automl.results import render_failures, render_trials_table, sorted_trials, trial_doc
    from automl.studies import load_study

    study_obj = load_study(study, storage)
    trials = sorted_trials(study_obj, state=state)
    if as_json:
        _print_json([trial_doc(t) for t in trials[:limit]])
        if len(trials) > limit:  # stdout stays one JSON document; the note goes to stderr
            _stderr().print(f"({len(trials) - limit} more trials not shown; use --limit)")
        return
    out = _stdout()
    if not trials:
        if state:
            word = {"fail": "failed"}.get(state.lower(), state.lower())
            n = len(study_obj.get_trials(deepcopy=False))
            out.print(f"study '{study}': no {word} trial (of {n})")
        else:
            out.print(f"study '{study}': no trial yet")
        return
    render_trials_table(out, study_obj, trials[:limit], title=f"trials of '{study}'")
    if len(trials) > limit:
        out.print(f"({len(trials) - limit} more; use --limit)")
    render_failures(out, study_obj)


@app.command()
@handle_errors
def best(
    study: Annotated[str, typer.Argument(help="Study name.")],
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The best trial (or the Pareto front for several objectives)."""
    from automl.results import best_summary, no_complete_trial, render_best
    from automl.studies import load_study

    study_obj = load_study(study, storage)
    doc = best_summary(study_obj)
    if doc is None:
        raise UsageError(no_complete_trial(study_obj))
    if as_json:
        _print_json(doc)
        return
    render_best(_stdout(), doc)


@app.command()
@handle_errors
def export(
    study: Annotated[str, typer.Argument(help="Study name.")],
    fmt: Annotated[str, typer.Option("--format", help="csv or json.")] = "csv",
    output: Annotated[
        Optional[Path], typer.Option("-o", "--output", help="File (else stdout).")
    ] = None,
    storage: StorageOpt = None,
) -> None:
    """Every trial: parameters, values, state, user attributes, durations."""
    from automl.results import export_trials
    from automl.studies import load_study

    if fmt not in ("csv", "json"):
        raise UsageError(f"--format must be csv or json, got {fmt!r}")
    study_obj = load_study(study, storage)
    if output is not None:
        _check_output(output, study_obj, storage)
    text = export_trials(study_obj, fmt=fmt)  # type: ignore[arg-type]
    if output is None:
        sys.stdout.write(text)
    else:
        _write_text(output, text)
        n = len(study_obj.trials)
        _stderr().print(f"wrote {n} trial{'s' if n != 1 else ''} to {output}")


@app.command()
@handle_errors
def delete(
    study: Annotated[str, typer.Argument(help="Study name.")],
    yes: Annotated[bool, typer.Option("--yes", help="Really delete it.")] = False,
    storage: StorageOpt = None,
) -> None:
    """Delete a study and its trials."""
    from automl.studies import delete_study

    if not yes:
        raise UsageError(f"deleting '{study}' cannot be undone; add --yes to confirm")
    delete_study(study, storage)
    _stdout().print(f"deleted study '{study}'")


# --------------------------------------------------------------------------- results


@app.command("retrain")
@handle_errors
def retrain_cmd(
    study: Annotated[str, typer.Argument(help="Study name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The model file to write.")],
    trial: Annotated[
        Optional[int],
        typer.Option(
            "--trial",
            min=0,
            help="Trial number (default: the best; required for several objectives).",
        ),
    ] = None,
    reuse: Annotated[
        bool, typer.Option("--reuse", help="Save the weights the search kept; no training.")
    ] = False,
    device: Annotated[
        str, typer.Option("--device", help="auto | cpu | cuda | cuda:N | mps.")
    ] = "auto",
    storage: StorageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train a trial's configuration on train + validation and save one model file."""
    from automl.results import best_summary, render_best
    from automl.retrain import ParetoTrialRequired, retrain
    from automl.studies import load_study

    study_obj = load_study(study, storage)
    _check_output(output, study_obj, storage)
    err = _stderr()
    progress = None
    if err.is_terminal and not as_json and not reuse:
        from rich.progress import Progress

        progress = Progress(console=err, transient=True)
    task = progress.add_task("retraining", total=None) if progress else None

    def epoch_done(done: int, total: int) -> None:
        if progress is not None and task is not None:
            progress.update(task, completed=done, total=total)

    try:
        if progress is not None:
            progress.start()
        result = retrain(
            study_obj,
            output=output,
            trial_number=trial,
            reuse=reuse,
            device=device,
            storage_url=storage,
            on_epoch=epoch_done,
        )
    except ParetoTrialRequired as exc:
        doc = best_summary(study_obj)
        if doc is not None:
            render_best(err, doc)
        raise _fail(str(exc), exc.exit_code) from None
    finally:
        if progress is not None:
            progress.stop()
    if as_json:
        _print_json(
            {
                "study": result.study,
                "trial": result.trial,
                "path": str(result.path),
                "epochs": result.epochs,
                "reused": result.reused,
                "n_train": result.n_train,
                "n_test": result.n_test,
                "test_metrics": result.test_metrics,
                "search_values": result.search_values,
                "seconds": round(result.seconds, 3),
                "n_params": result.n_params,
            }
        )
        return
    out = _stdout()
    how = (
        "took the weights the search kept"
        if result.reused
        else f"trained on {result.n_train} rows (train + validation) for {result.epochs} epoch(s)"
    )
    out.print(
        f"trial #{result.trial} of '{result.study}': {how} in {result.seconds:.1f}s",
        soft_wrap=True,
    )
    if result.test_metrics:
        scores = ", ".join(f"{k} {v:.4g}" for k, v in result.test_metrics.items())
        out.print(f"test split ({result.n_test} rows): {scores}", soft_wrap=True)
    else:
        out.print("no test split (data.test is 0): no held-out score")
    size = result.path.stat().st_size
    out.print(
        f"saved {result.path} ({size / 1024:.1f} KiB, {result.n_params} parameters); "
        f"next: automl predict {shlex.quote(str(result.path))} DATA_FILE",
        soft_wrap=True,
    )


@app.command("predict")
@handle_errors
def predict_cmd(
    model_file: Annotated[Path, typer.Argument(metavar="MODEL_FILE", help="From retrain.")],
    data_file: Annotated[Path, typer.Argument(metavar="DATA_FILE", help="CSV, Parquet or NPZ.")],
    output: Annotated[
        Optional[Path],
        typer.Option("-o", "--output", help="CSV or .parquet file (else CSV to stdout)."),
    ] = None,
    proba: Annotated[
        bool, typer.Option("--proba", help="Add one probability column per class.")
    ] = False,
) -> None:
    """Predict every row of a data file with a model file; CSV in the input's row order."""
    from automl.retrain import predict_file, prediction_format, write_predictions

    if output is not None:  # a bad output is bad input: before the work
        prediction_format(output, (data_file, model_file))
    prediction = predict_file(model_file, data_file, proba=proba)
    text = write_predictions(prediction, output)
    if text is not None:
        sys.stdout.write(text)
        return
    _stderr().print(f"wrote {len(prediction.frame)} predictions to {output}")


@app.command("report")
@handle_errors
def report_cmd(
    study: Annotated[str, typer.Argument(help="Study name.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="The HTML file to write.")] = Path(
        "report.html"
    ),
    storage: StorageOpt = None,
) -> None:
    """Write a self-contained HTML report (plots work offline)."""
    from automl.report import write_report
    from automl.studies import load_study

    study_obj = load_study(study, storage)
    _check_output(output, study_obj, storage)
    summary = write_report(study_obj, output, storage_url=storage)
    out = _stdout()
    out.print(
        f"wrote {summary.path} ({summary.n_bytes / 1e6:.1f} MB, {summary.n_plots} "
        f"plot{'s' if summary.n_plots != 1 else ''}); "
        "open it in any browser, no network needed",
        soft_wrap=True,
    )
    for line in summary.skipped:
        out.print(f"  not shown: {line}", soft_wrap=True)


@app.command("dashboard")
@handle_errors
def dashboard_cmd(
    storage: StorageOpt = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", min=0, max=65535, help="Port (0: any free one).")
    ] = 8080,
) -> None:
    """Serve optuna-dashboard on the storage until Ctrl-C."""
    from rich.markup import escape

    from automl.dashboard import is_local, serve_dashboard
    from automl.storage import mask_url, resolve_storage_url

    url = resolve_storage_url(storage)
    err = _stderr()
    if not is_local(host):
        err.print(
            f"[yellow]warning:[/yellow] listening on {escape(host)}: the dashboard has no "
            "authentication, anyone who can reach this port can read and change the studies",
            markup=True,
            soft_wrap=True,
        )

    def ready(address: str) -> None:
        _stdout().print(
            f"optuna-dashboard for {mask_url(url)} at {address} (Ctrl-C stops it)", soft_wrap=True
        )
        sys.stdout.flush()

    serve_dashboard(url, host=host, port=port, on_ready=ready)
    err.print("dashboard stopped")


@app.command()
@handle_errors
def enqueue(
    study: Annotated[str, typer.Argument(help="Study name.")],
    params: Annotated[
        str,
        typer.Option("--params", help='JSON, e.g. \'{"optimizer": "adam", "adam_lr": 0.001}\'.'),
    ],
    storage: StorageOpt = None,
) -> None:
    """Queue one configuration (checked against the study's space); the next run trains
    it first. Parameters left out are sampled."""
    from automl.lifecycle import enqueue_params, study_space
    from automl.studies import load_study

    try:
        doc = json.loads(params)
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--params is not valid JSON ({exc.msg} at column {exc.colno}); "
            'e.g. --params \'{"optimizer": "adam"}\''
        ) from None
    if not isinstance(doc, dict):
        raise UsageError('--params must be a JSON object, e.g. \'{"optimizer": "adam"}\'')
    study_obj = load_study(study, storage)
    kept, queued = enqueue_params(study_obj, study_space(study_obj), doc, source="enqueue")
    shown = json.dumps(kept)
    if queued:
        _stdout().print(f"queued {shown} in study '{study}'; the next run trains it first")
    else:
        _stdout().print(f"study '{study}' already holds {shown}; nothing queued")


# --------------------------------------------------------------------------- space


@space_app.command("check")
@handle_errors
def space_check(space_file: Annotated[Path, typer.Argument(metavar="SPACE")]) -> None:
    """Validate a space file: 'valid', or every problem found (exit 2)."""
    from automl.errors import SpaceError
    from automl.spaces import distributions, load_space

    try:
        space = load_space(space_file)
    except SpaceError as exc:
        from rich.markup import escape

        err = _stderr()
        for line in exc.errors:
            err.print(f"[red]error:[/red] {escape(line)}", markup=True, soft_wrap=True)
        raise typer.Exit(2) from None
    from automl.spaces import Fixed
    from automl.studies import create_pruner, create_sampler, load_for_space

    # What `run` checks before it writes anything: the sampler's and pruner's options,
    # and the data (its file, target, split, and the loss and objective it allows).
    problems = []
    checks = (
        lambda: create_sampler(space, space.study.seed),
        lambda: create_pruner(space),
        lambda: load_for_space(space, space.study.seed),
    )
    for check in checks:
        try:
            check()
        except AutomlError as exc:
            problems.append(str(exc))
    if problems:
        for line in problems:
            _fail(line, 2)
        raise typer.Exit(2)
    every = distributions(space)
    n = sum(not isinstance(d, Fixed) for d in every.values())
    fixed = f", {len(every) - n} fixed" if len(every) > n else ""
    _stdout().print(
        f"{space_file}: valid ({n} searched parameter(s){fixed}, objective "
        f"{', '.join(space.objectives)})"
    )


@space_app.command("show")
@handle_errors
def space_show(space_file: Annotated[Path, typer.Argument(metavar="SPACE")]) -> None:
    """A table of every parameter, its distribution and its condition."""
    from rich.table import Table

    from automl.spaces import Fixed, condition_of, distributions, load_space

    space = load_space(space_file)
    table = Table(title=f"{space_file}")
    table.add_column("parameter")
    table.add_column("distribution")
    table.add_column("condition")
    for name, dist in distributions(space).items():
        if isinstance(dist, Fixed):
            continue
        table.add_row(name, dist.describe(), condition_of(space, name))
    for opt, own in space.optimizer.options.items():
        for p, dist in own.items():
            if isinstance(dist, Fixed):
                table.add_row(f"{opt}_{p}", dist.describe(), f"optimizer = {opt}")
    for name, dist in space.params.items():
        if isinstance(dist, Fixed):
            table.add_row(name, dist.describe(), condition_of(space, name))
    out = _stdout()
    out.print(table)
    data = space.data
    source = data.dataset or data.path
    out.print(
        f"data: {source}  model: {space.model}  epochs: {space.train.epochs}  "
        f"patience: {space.train.patience}  objective: {', '.join(space.objectives)}  "
        f"sampler: {space.study.sampler.name}  pruner: "
        f"{'none (several objectives)' if space.is_multi_objective else space.study.pruner.name}"
    )


@space_app.command("new")
@handle_errors
def space_new(
    file: Annotated[Path, typer.Argument(metavar="FILE")],
    force: Annotated[bool, typer.Option("--force", help="Overwrite an existing file.")] = False,
) -> None:
    """Write a commented starter space file."""
    from automl.templates import STARTER_SPACE

    if file.exists() and not force:
        raise UsageError(f"{file} already exists; add --force to overwrite it")
    if file.is_file():
        with file.open("rb") as fh:
            head = fh.read(16)
        if head.startswith((b"SQLite format 3", b'{"op_code"')):  # SQLite, an Optuna journal
            raise UsageError(f"{file} is a study storage, not a space file; write to another file")
    _write_text(file, STARTER_SPACE)
    _stdout().print(f"wrote {file}; try: automl space check {file} && automl run {file}")


def entry() -> None:
    """The ``automl`` console script: the app, then a prompt exit.

    A process that imported torch, Optuna and pandas spends 0.5-1 s tearing their modules
    down at exit (BENCHMARKS.md), for nothing: so once the command has finished, output
    is flushed, logs and database connections are closed, and the process ends at once."""
    import os
    import signal
    import threading

    def terminated(signum: int, _frame: Any) -> None:
        # As Ctrl-C does: the command's cleanup runs (a temporary output file removed),
        # then exit 143. `run`, the dashboard and workers install their own handlers.
        raise SystemExit(128 + signum)

    code: Any = 0
    try:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, terminated)
        app()
    except SystemExit as exc:
        code = exc.code
    except KeyboardInterrupt:
        code = 130
    finally:
        status = 0 if code is None else code if isinstance(code, int) else 1
        # Whatever happens below, the process ends: its work is committed by now.
        watchdog = threading.Timer(EXIT_GRACE_SECONDS, os._exit, args=(status,))
        watchdog.daemon = True
        watchdog.start()
        try:
            if not isinstance(code, (int, type(None))):
                print(code, file=sys.stderr)  # SystemExit("message")
            sys.stdout.flush()
            sys.stderr.flush()
        except Exception:  # a closed pipe (automl ... | head): nothing left to say
            pass
        logging.shutdown()
        if "automl.storage" in sys.modules:
            from automl.storage import close_storages

            close_storages()
    os._exit(status)


# How long closing logs and connections may take before the process ends regardless.
EXIT_GRACE_SECONDS = 10.0


if __name__ == "__main__":  # pragma: no cover
    entry()
