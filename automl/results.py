"""Reading a study: best trials, tables, failures, export."""

from __future__ import annotations

import csv
import io
import json
import math
import shlex
from collections import Counter
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial
    from rich.console import Console

_STATES = ("complete", "pruned", "fail", "running", "waiting")


def _sort_key(study: optuna.Study) -> Any:
    sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0

    def key(t: FrozenTrial) -> tuple[int, float, int]:
        order = {"COMPLETE": 0, "PRUNED": 1, "RUNNING": 2, "WAITING": 3, "FAIL": 4}
        value = t.values[0] if t.values else None
        v = sign * value if value is not None and math.isfinite(value) else math.inf
        return (order.get(t.state.name, 5), v if t.state.name == "COMPLETE" else 0.0, t.number)

    return key


def sorted_trials(study: optuna.Study, *, state: str | None = None) -> list[FrozenTrial]:
    """Trials best first: complete by value, then pruned, running, failed."""
    from automl.errors import UsageError

    trials = study.get_trials(deepcopy=False)
    if state is not None:
        wanted = state.lower()
        if wanted not in _STATES:
            raise UsageError(f"--state must be one of {', '.join(_STATES)}, got {state!r}")
        trials = [t for t in trials if t.state.name.lower() == wanted]
    return sorted(trials, key=_sort_key(study))


def top_trials(study: optuna.Study, *, limit: int = 5) -> list[FrozenTrial]:
    return [t for t in sorted_trials(study, state="complete")][:limit]


def trial_doc(trial: FrozenTrial) -> dict[str, Any]:
    """A trial as plain JSON-able data."""
    return {
        "number": trial.number,
        "state": trial.state.name.lower(),
        "value": trial.values[0] if trial.values and len(trial.values) == 1 else None,
        "values": trial.values,
        "params": trial.params,
        "user_attrs": trial.user_attrs,
        "intermediate_values": {str(k): v for k, v in trial.intermediate_values.items()},
        "datetime_start": trial.datetime_start.isoformat() if trial.datetime_start else None,
        "datetime_complete": (
            trial.datetime_complete.isoformat() if trial.datetime_complete else None
        ),
        "duration_seconds": trial.duration.total_seconds() if trial.duration else None,
    }


def best_summary(study: optuna.Study) -> dict[str, Any] | None:
    """``best --json``: the best trial, or for several objectives the Pareto front."""
    if len(study.directions) > 1:
        front = study.best_trials
        if not front:
            return None
        # The contract's top-level fields name the front's best trial on the first objective.
        sign = -1.0 if study.directions[0].name == "MAXIMIZE" else 1.0
        first = min(front, key=lambda t: (sign * t.values[0], t.number))
        return {
            "study": study.study_name,
            "directions": [d.name.lower() for d in study.directions],
            "objectives": study.metric_names,
            "number": first.number,
            "values": first.values,
            "params": first.params,
            "user_attrs": first.user_attrs,
            "best_trials": [
                {
                    "number": t.number,
                    "values": t.values,
                    "params": t.params,
                    "user_attrs": t.user_attrs,
                }
                for t in front
            ],
        }
    try:
        t = study.best_trial
    except ValueError:
        return None
    return {
        "study": study.study_name,
        "direction": study.direction.name.lower(),
        "objective": study.metric_names[0] if study.metric_names else None,
        "number": t.number,
        "value": t.value,
        "params": t.params,
        "user_attrs": t.user_attrs,
        "duration_seconds": t.duration.total_seconds() if t.duration else None,
    }


def format_value(value: Any) -> str:
    """A value for a table cell: 4 significant digits, ``-`` for none, lists joined."""
    if value is None:
        return "-"
    if isinstance(value, (list, tuple)):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e12:  # a count (n_params 32791, not 3.279e+04)
            return str(int(value))
        return f"{value:.4g}"
    return str(value)


def _fmt_duration(trial: FrozenTrial) -> str:
    if trial.duration is None:
        return "-"
    seconds = trial.duration.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def trial_note(trial: FrozenTrial) -> str:
    """Why a trial failed or was pruned (empty otherwise), on one line."""
    note = trial.user_attrs.get("fail_reason") or trial.user_attrs.get("prune_reason") or ""
    if not note and trial.state.name == "FAIL":
        note = "no heartbeat (killed?)"
    return " ".join(str(note).split())


def display_params(trial: FrozenTrial) -> dict[str, Any]:
    """A trial's parameters for a table: each optimizer's own learning rate
    (``adam_lr``, ``sgd_lr``) shown as one ``lr``, the others as they are."""
    out: dict[str, Any] = {}
    for name, value in trial.params.items():
        own = name.split("_", 1)[0] == trial.params.get("optimizer", name.split("_", 1)[0])
        if name.endswith("_lr") and own:
            out.setdefault("lr", value)
        else:
            out[name] = value
    return out


def key_params(trials: list[FrozenTrial]) -> list[str]:
    """Parameters in the order a table shows them: those every trial has first, in the
    space's order (optimizer, lr, loss, ...); parameters that never change are left out."""
    order: dict[str, int] = {}
    values: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for t in trials:
        for name, value in display_params(t).items():
            order.setdefault(name, len(order))
            values.setdefault(name, set()).add(repr(value))
            counts[name] += 1
    varied = [n for n in order if len(values[n]) > 1]
    return sorted(varied, key=lambda n: (-counts[n], order[n]))


_CELL_EXTRA = 3  # padding either side and one separator per column
_NOTE_MIN = 24


def _width(header: str, cells: list[str]) -> int:
    return max([len(header), *(len(c) for c in cells)]) + _CELL_EXTRA


def trial_rows(
    study: optuna.Study, trials: list[FrozenTrial], *, width: int
) -> tuple[list[str], list[list[str]], list[str]]:
    """The table's header and rows, fitted to ``width`` columns of text: fixed columns,
    then as many key parameters as fit, then the failure/prune note (cut, never wrapped).
    Returns (header, rows, parameters left out)."""
    names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
    fixed_header = ["#", "state", *[str(n) for n in names], "epochs", "time"]
    fixed: list[list[str]] = []
    for t in trials:
        values = list(t.values) if t.values else [None] * len(names)
        fixed.append(
            [
                str(t.number),
                t.state.name.lower(),
                *[format_value(v) for v in values],
                format_value(t.user_attrs.get("epochs_run")),
                _fmt_duration(t),
            ]
        )
    notes = [trial_note(t) for t in trials]
    has_note = any(notes)
    used = -2 + sum(  # no outer edges: two characters fewer than the columns' share
        _width(h, [row[i] for row in fixed]) for i, h in enumerate(fixed_header)
    )
    reserve = min(_NOTE_MIN, max(len(n) for n in notes) + _CELL_EXTRA) if has_note else 0
    shown: list[str] = []
    params = [display_params(t) for t in trials]
    for name in key_params(trials):
        cells = [format_value(p.get(name)) for p in params]
        w = _width(name, cells)
        if used + w + reserve > width:
            continue  # a narrower parameter further down may still fit
        shown.append(name)
        used += w
    header = [*fixed_header, *shown]
    rows = [
        [*row, *[format_value(p.get(name)) for name in shown]]
        for row, p in zip(fixed, params, strict=True)
    ]
    if has_note:
        header.append("note")
        room = max(width - used - _CELL_EXTRA + 1, 8)  # the last column has no separator
        for row, note in zip(rows, notes, strict=True):
            row.append(note if len(note) <= room else note[: room - 1] + "…")
    left_out = [p for p in key_params(trials) if p not in shown]
    return header, rows, left_out


def render_trials_table(
    console: Console, study: optuna.Study, trials: list[FrozenTrial], *, title: str
) -> None:
    """The trials as a table that fits the console (80 columns when not a terminal)."""
    from rich import box
    from rich.table import Table

    header, rows, left_out = trial_rows(study, trials, width=console.width)
    n_values = len(study.directions)
    table = Table(
        title=title, box=box.SIMPLE_HEAD, title_justify="left", show_edge=False, pad_edge=False
    )
    for i, name in enumerate(header):
        right = i == 0 or 2 <= i < 2 + n_values + 1  # number, values, epochs
        if name == "note":
            table.add_column(name, no_wrap=True, overflow="ellipsis", min_width=8)
        else:
            table.add_column(name, justify="right" if right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    same = constant_params(trials)
    if same:  # not a column each: named once, below the table
        what = "parameters" if len(trials) == 1 else "the same in every row"
        listed = ", ".join(f"{k} {format_value(v)}" for k, v in same.items())
        console.print(f"{what}: {listed}", highlight=False)
    if left_out:
        console.print(
            f"not shown: {', '.join(left_out)} (see automl show --json or automl export)",
            highlight=False,
        )


def constant_params(trials: list[FrozenTrial]) -> dict[str, Any]:
    """Parameters every one of ``trials`` has, with one value (left out of the columns by
    key_params): a table of one trial, or of the best few that all took adam, names them
    once under the table."""
    if not trials:
        return {}
    shown = [display_params(t) for t in trials if t.params]
    if not shown:
        return {}
    first = shown[0]
    return {
        name: value
        for name, value in first.items()
        if all(name in p and repr(p[name]) == repr(value) for p in shown[1:])
    }


# A failed trial without a recorded reason was failed by the heartbeat check: its process
# was killed (kill -9, out of memory) or its machine was lost mid-trial.
NO_REASON = "no reason recorded: its process stopped (killed, or its machine lost)"


def failure_reasons(study: optuna.Study) -> Counter[str]:
    """Failed trials grouped by reason."""
    reasons: Counter[str] = Counter()
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "FAIL":
            reasons[str(t.user_attrs.get("fail_reason", NO_REASON))] += 1
    return reasons


def render_failures(console: Console, study: optuna.Study) -> None:
    reasons = failure_reasons(study)
    if not reasons:
        return
    from rich.table import Table

    table = Table(title="failures by reason")
    table.add_column("count", justify="right")
    table.add_column("reason")
    for reason, count in reasons.most_common():
        table.add_row(str(count), reason)
    console.print(table)


_METRIC_ORDER = ("val_", "test_", "train_loss", "n_params", "epochs_run", "best_epoch")


def _metric_rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(_METRIC_ORDER):
        if name.startswith(prefix):
            return (i, name)
    return (len(_METRIC_ORDER), name)


def _kv_table(title: str, rows: list[tuple[str, Any]]) -> Any:
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, show_header=False, title_justify="left")
    table.add_column("name", no_wrap=True)
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, format_value(value))
    return table


def render_best(console: Console, doc: dict[str, Any]) -> None:
    """``best`` for people: the trial, its parameters and its metrics side by side (or,
    for several objectives, the Pareto front's trials)."""
    from rich import box
    from rich.columns import Columns
    from rich.table import Table

    if "best_trials" in doc:
        names = [str(n) for n in (doc.get("objectives") or doc["directions"])]
        console.print(
            f"study '{doc['study']}': {len(doc['best_trials'])} trial(s) on the Pareto front of "
            + ", ".join(f"{n} ({d})" for n, d in zip(names, doc["directions"], strict=False)),
            soft_wrap=True,
        )
        front = sorted(doc["best_trials"], key=lambda t: t["values"][0])
        shown = [_display(t["params"]) for t in front]
        params: list[str] = []
        for p in shown:
            params += [name for name in p if name not in params]
        fixed = [[str(t["number"]), *[format_value(v) for v in t["values"]]] for t in front]
        used = -2 + sum(_width(h, [row[i] for row in fixed]) for i, h in enumerate(["#", *names]))
        fitted = []
        for name in params:
            w = _width(name, [format_value(p.get(name)) for p in shown])
            if used + w <= console.width:
                fitted.append(name)
                used += w
        table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for col in ["#", *names, *fitted]:
            table.add_column(col, no_wrap=True)
        for row, p in zip(fixed, shown, strict=True):
            table.add_row(*row, *[format_value(p.get(name)) for name in fitted])
        console.print(table)
        left_out = [name for name in params if name not in fitted]
        if left_out:
            console.print(f"not shown: {', '.join(left_out)} (see automl best --json)")
        console.print("pick one for retrain with --trial N", style="dim")
        return
    duration = doc.get("duration_seconds")
    console.print(
        f"study '{doc['study']}': best trial #{doc['number']}, "
        f"{doc.get('objective') or 'value'} = {doc['value']:.6g} ({doc['direction']})"
        + (f", trained in {duration:.1f}s" if duration is not None else ""),
        soft_wrap=True,
    )
    attrs = {
        k: v
        for k, v in doc["user_attrs"].items()
        if not isinstance(v, (dict, list)) and not k.endswith("_path")
    }
    metrics = sorted(attrs.items(), key=lambda kv: _metric_rank(kv[0]))
    console.print(
        Columns(
            [
                _kv_table("parameters", list(doc["params"].items())),
                _kv_table("metrics", metrics),
            ],
            padding=(0, 4),
        )
    )


def _display(params: dict[str, Any]) -> dict[str, Any]:
    """``display_params`` for a plain parameter mapping."""
    from types import SimpleNamespace

    return display_params(SimpleNamespace(params=params))  # type: ignore[arg-type]


def export_trials(study: optuna.Study, *, fmt: Literal["csv", "json"]) -> str:
    """Every trial, one row each: number, state, values, params, user attrs, duration."""
    docs = [trial_doc(t) for t in study.get_trials(deepcopy=False)]
    if fmt == "json":
        return json.dumps({"study": study.study_name, "trials": docs}, indent=2, default=str) + "\n"
    names = study.metric_names or [f"value{i}" for i in range(len(study.directions))]
    param_cols = sorted({p for d in docs for p in d["params"]})
    attr_cols = sorted({a for d in docs for a in d["user_attrs"]})
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(
        [
            "number",
            "state",
            *[f"value_{n}" for n in names],
            *[f"params_{p}" for p in param_cols],
            *[f"user_attrs_{a}" for a in attr_cols],
            "datetime_start",
            "datetime_complete",
            "duration_seconds",
        ]
    )
    for d in docs:
        values = d["values"] or [None] * len(names)
        writer.writerow(
            [
                d["number"],
                d["state"],
                *values,
                *[d["params"].get(p, "") for p in param_cols],
                *[_csv_cell(d["user_attrs"].get(a, "")) for a in attr_cols],
                d["datetime_start"] or "",
                d["datetime_complete"] or "",
                d["duration_seconds"] if d["duration_seconds"] is not None else "",
            ]
        )
    return buf.getvalue()


def _csv_cell(value: Any) -> Any:
    """Lists and mappings as JSON text, so one row stays one trial."""
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return value


def no_complete_trial(study: optuna.Study) -> str:
    """Why a study has no best trial yet, and what to look at: its trials by state."""
    counts = Counter(t.state.name.lower() for t in study.get_trials(deepcopy=False))
    name = study.study_name
    if not counts:
        return f"study '{name}' has no trial yet; run it first"
    states = ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
    return (
        f"study '{name}' has no complete trial: its {sum(counts.values())} trial(s) are "
        f"{states}; see why with automl show {shlex.quote(name)}"
    )
