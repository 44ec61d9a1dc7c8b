"""A self-contained HTML report of a study: one file, plotly's JavaScript inlined once,
readable offline. The plots are ``optuna.visualization``'s; the tables are ours."""

from __future__ import annotations

import html
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from automl.errors import AutomlError

if TYPE_CHECKING:
    import optuna
    import plotly.graph_objects as go
    from optuna.trial import FrozenTrial

log = logging.getLogger(__name__)

MAX_SLICE_PARAMS = 8  # a slice plot per parameter gets unreadable past this


@dataclass
class Section:
    """One part of the report: a title, its HTML, and whether it holds a plot."""

    title: str
    body: str
    plot: bool = False


@dataclass
class ReportSummary:
    """What went into the report (for the CLI to print)."""

    path: Path
    n_bytes: int
    n_plots: int
    sections: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "section: why"


def _e(value: Any) -> str:
    """Escaped text, passwords in any URL masked."""
    from automl.storage import mask_url

    return html.escape(mask_url(str(value)))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _table(header: list[str], rows: list[list[Any]], *, cls: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{_e(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows
    )
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


# --------------------------------------------------------------------------- sections


def _complete(study: optuna.Study) -> list[FrozenTrial]:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def _objective_names(study: optuna.Study) -> list[str]:
    names = study.metric_names
    return (
        [str(n) for n in names]
        if names
        else [f"objective {i}" for i in range(len(study.directions))]
    )


def summary_section(study: optuna.Study, storage_url: str | None) -> Section:
    """Counts by state, objectives, best value, timing and the space file."""
    from automl.storage import mask_url, resolve_storage_url

    trials = study.get_trials(deepcopy=False)
    counts = Counter(t.state.name.lower() for t in trials)
    names = _objective_names(study)
    directions = [d.name.lower() for d in study.directions]
    rows: list[list[Any]] = [
        ["study", study.study_name],
        ["storage", mask_url(resolve_storage_url(storage_url))],
        ["objectives", ", ".join(f"{n} ({d})" for n, d in zip(names, directions, strict=False))],
        ["trials", len(trials)],
        *[
            [f"  {s}", counts.get(s, 0)]
            for s in ("complete", "pruned", "fail", "running", "waiting")
        ],
    ]
    if len(study.directions) == 1:
        try:
            best = study.best_trial
            rows.append(["best value", f"{best.value:.6g} (trial #{best.number})"])
        except ValueError:
            rows.append(["best value", "- (no complete trial)"])
    else:
        rows.append(["Pareto front", f"{len(study.best_trials)} trial(s)"])
    starts = [t.datetime_start for t in trials if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if starts:
        rows.append(["first trial started", min(starts).isoformat(sep=" ", timespec="seconds")])
    if ends:
        rows.append(["last trial finished", max(ends).isoformat(sep=" ", timespec="seconds")])
    busy = sum(t.duration.total_seconds() for t in trials if t.duration)
    rows.append(["trial time (sum)", f"{busy:.1f} s"])
    if study.user_attrs.get("automl_version"):
        rows.append(["automl", study.user_attrs["automl_version"]])
    body = _table(["", ""], rows, cls="kv")
    space = study.user_attrs.get("space")
    if space:
        body += f"<h3>space</h3><pre>{_e(space)}</pre>"
    return Section("Summary", body)


def best_section(study: optuna.Study) -> Section:
    """The best trial's parameters and metrics (or the Pareto front's trials)."""
    names = _objective_names(study)
    if len(study.directions) > 1:
        front = sorted(study.best_trials, key=lambda t: t.number)
        if not front:
            return Section("Best trial", _note("No complete trial yet."))
        names_p = sorted({p for t in front for p in t.params})
        rows = [[t.number, *(t.values or []), *[t.params.get(p) for p in names_p]] for t in front]
        return Section("Pareto front trials", _table(["#", *names, *names_p], rows, cls="wide"))
    try:
        best = study.best_trial
    except ValueError:
        return Section("Best trial", _note("No complete trial yet."))
    params = _table(["parameter", "value"], [[k, v] for k, v in best.params.items()])
    attrs = {k: v for k, v in best.user_attrs.items() if not k.endswith("_path")}
    metrics = [[k, v] for k, v in attrs.items() if not isinstance(v, (dict, list))]
    if best.duration:
        metrics.append(["duration_seconds", round(best.duration.total_seconds(), 3)])
    body = (
        f"<p>Trial #{best.number}: {_e(names[0])} = {_e(_fmt(best.value))}</p>"
        f'<div class="cols"><div>{params}</div><div>'
        f"{_table(['metric / attribute', 'value'], metrics)}</div></div>"
    )
    return Section(f"Best trial (#{best.number})", body)


def failures_section(study: optuna.Study) -> Section:
    """Failed trials grouped by reason, pruned trials by reason."""
    from automl.results import failure_reasons

    reasons = failure_reasons(study)
    body = ""
    if reasons:
        body += _table(["failed trials", "reason"], [[n, r] for r, n in reasons.most_common()])
    else:
        body += _note("No trial failed.")
    pruned: Counter[str] = Counter()
    for t in study.get_trials(deepcopy=False):
        if t.state.name == "PRUNED":
            reason = str(t.user_attrs.get("prune_reason", "pruned"))
            # "pruned at epoch 3 with val_accuracy=0.5": group by epoch, not by value
            pruned[reason.split(" with ")[0]] += 1
    if pruned:
        body += _table(["pruned trials", "reason"], [[n, r] for r, n in pruned.most_common()])
    return Section("Failures", body)


# --------------------------------------------------------------------------- plots


PlotFn = Callable[[], "go.Figure"]


def _plots(study: optuna.Study) -> list[tuple[str, PlotFn | None, str]]:
    """(title, figure maker or None, why it is missing) for every plot that applies."""
    import optuna.visualization as vis

    names = _objective_names(study)
    complete = _complete(study)
    multi = len(study.directions) > 1
    out: list[tuple[str, PlotFn | None, str]] = []
    if not complete:
        why = "needs at least one complete trial"
        for title in (
            "Optimization history",
            "Parameter importances",
            "Parallel coordinates",
            "Slice",
        ):
            out.append((title, None, why))
    else:
        targets: list[tuple[str, Callable[[FrozenTrial], float] | None]] = (
            [(n, _nth(i)) for i, n in enumerate(names)] if multi else [(names[0], None)]
        )
        for name, target in targets:
            suffix = f": {name}" if multi else ""
            out.append(
                (
                    f"Optimization history{suffix}",
                    _bind(vis.plot_optimization_history, study, target=target, target_name=name),
                    "",
                )
            )
        if len(complete) < 2:
            out.append(("Parameter importances", None, "needs at least 2 complete trials"))
        else:
            for i, (name, target) in enumerate(targets):
                suffix = f": {name}" if multi else ""
                if multi:  # the evaluator takes a target as one to minimise
                    target = _minimised(i, study.directions[i])
                out.append(
                    (
                        f"Parameter importances{suffix}",
                        _bind(vis.plot_param_importances, study, target=target, target_name=name),
                        "",
                    )
                )
        target, name = (_nth(0), names[0]) if multi else (None, names[0])
        params = _ranked_params(study, complete)
        if not params:
            out.append(("Parallel coordinates", None, "no parameter varies across the trials"))
            out.append(("Slice", None, "no parameter varies across the trials"))
        else:
            out.append(
                (
                    "Parallel coordinates",
                    # Several objectives: coloured by Pareto rank (the front darkest).
                    # Optuna reverses the scale for any custom target, which drew the
                    # best trials of a maximised one near-white.
                    _bind(vis.plot_parallel_coordinate, study)
                    if multi
                    else _bind(vis.plot_parallel_coordinate, study, target_name=name),
                    "",
                )
            )
            out.append(
                (
                    "Slice",
                    _bind(
                        vis.plot_slice,
                        study,
                        params=params[:MAX_SLICE_PARAMS],
                        target=target,
                        target_name=name,
                    ),
                    ""
                    if len(params) <= MAX_SLICE_PARAMS
                    else f"Not shown here (the least important): "
                    f"{', '.join(params[MAX_SLICE_PARAMS:])}.",
                )
            )
    from optuna.trial import TrialState

    # (Optuna draws the curves of complete, pruned and running trials, never failed ones.)
    drawn = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    if any(t.intermediate_values for t in study.get_trials(deepcopy=False, states=drawn)):
        out.append(("Learning curves", _bind(_learning_curves, study), ""))
    else:
        why = (
            "multi-objective trials report no per-epoch values"
            if multi
            else "no complete, pruned or running trial reported per-epoch values"
        )
        out.append(("Learning curves", None, why))
    if multi:
        if complete and len(study.directions) <= 3:
            out.append(
                ("Pareto front", _bind(vis.plot_pareto_front, study, target_names=names), "")
            )
        else:
            out.append(("Pareto front", None, "needs complete trials and at most 3 objectives"))
    if study.get_trials(deepcopy=False):
        out.append(("Timeline", _bind(vis.plot_timeline, study), ""))
    return out


def _learning_curves(study: optuna.Study) -> go.Figure:
    """Optuna's intermediate-value plot, with epochs counted from 1 as everywhere else
    (the trials table, 'pruned at epoch 2', best_epoch) instead of 0-based steps."""
    import optuna.visualization as vis

    fig = vis.plot_intermediate_values(study)
    for trace in fig.data:
        if trace.x is not None:
            trace.x = [x + 1 for x in trace.x]
    fig.update_xaxes(title_text="Epoch")
    return fig


def _nth(i: int) -> Callable[[FrozenTrial], float]:
    def target(t: FrozenTrial) -> float:
        return float(t.values[i])

    return target


def _minimised(i: int, direction: Any) -> Callable[[FrozenTrial], float]:
    """Objective ``i`` as a value to minimise: Optuna's importance evaluator (PED-ANOVA)
    takes a custom target as lower-is-better, so a maximised objective is negated; else
    its importances explain the worst trials (and those of accuracy and n_params, both
    found in the smallest models, came out the same)."""
    from optuna.study import StudyDirection

    sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0

    def target(t: FrozenTrial) -> float:
        return sign * float(t.values[i])

    return target


def _bind(fn: Callable[..., go.Figure], *args: Any, **kwargs: Any) -> PlotFn:
    return lambda: fn(*args, **kwargs)


def _ranked_params(study: optuna.Study, trials: list[FrozenTrial]) -> list[str]:
    """The varied parameters, most important first (for the first objective) where
    importances can be computed, else most common first: the slice plot keeps the first
    MAX_SLICE_PARAMS (by frequency alone it left out a conditional learning rate that
    mattered most)."""
    params = _varied_params(trials)
    if len(params) <= MAX_SLICE_PARAMS or len(trials) < 2:
        return params
    import warnings

    from optuna.importance import get_param_importances

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            target = _minimised(0, study.directions[0]) if len(study.directions) > 1 else None
            ranked = list(get_param_importances(study, target=target))
    except Exception:  # (importances need enough trials of every parameter)
        return params
    return [p for p in ranked if p in params] + [p for p in params if p not in ranked]


def _varied_params(trials: list[FrozenTrial]) -> list[str]:
    """Parameters with more than one value among ``trials``, most common first."""
    seen: dict[str, set[str]] = {}
    counts: Counter[str] = Counter()
    for t in trials:
        for k, v in t.params.items():
            seen.setdefault(k, set()).add(repr(v))
            counts[k] += 1
    return [k for k, _ in counts.most_common() if len(seen[k]) > 1]


def _figure_html(fig: go.Figure) -> str:
    # optuna sizes some plots (slice: 300 px per parameter); fit the page width instead
    fig.update_layout(
        template="plotly_white",
        margin={"l": 60, "r": 30, "t": 50, "b": 50},
        width=None,
        autosize=True,
    )
    return str(
        fig.to_html(
            full_html=False,
            include_plotlyjs=False,  # inlined once in <head>
            config={"displaylogo": False, "responsive": True},
        )
    )


# --------------------------------------------------------------------------- the page


def build_report(
    study: optuna.Study, *, storage_url: str | None = None
) -> tuple[str, ReportSummary]:
    """The report's HTML and what it holds."""
    import warnings

    from plotly.offline import get_plotlyjs

    summary = ReportSummary(path=Path(), n_bytes=0, n_plots=0)
    sections = [summary_section(study, storage_url), best_section(study)]
    for title, make, why in _plots(study):
        if make is None:
            sections.append(Section(title, _note(f"Not shown: {why}.")))
            summary.skipped.append(f"{title}: {why}")
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                body = _figure_html(make())
        except (ValueError, RuntimeError, ZeroDivisionError) as exc:
            # e.g. importances when every trial scored the same value
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            sections.append(Section(title, _note(f"Not shown: {first}")))
            summary.skipped.append(f"{title}: {first}")
            continue
        sections.append(Section(title, body + (_note(why) if why else ""), plot=True))
        summary.n_plots += 1
    sections.append(failures_section(study))
    summary.sections = [s.title for s in sections]
    made = datetime.now(timezone.utc).isoformat(sep=" ", timespec="seconds")
    nav = " · ".join(f'<a href="#s{i}">{_e(s.title)}</a>' for i, s in enumerate(sections))
    parts = "\n".join(
        f'<section id="s{i}"><h2>{_e(s.title)}</h2>{s.body}</section>'
        for i, s in enumerate(sections)
    )
    page = _PAGE.format(
        title=_e(f"automl report: {study.study_name}"),
        heading=_e(study.study_name),
        made=_e(made),
        nav=nav,
        sections=parts,
        plotlyjs=get_plotlyjs(),
    )
    return page, summary


def write_report(
    study: optuna.Study, path: str | Path, *, storage_url: str | None = None
) -> ReportSummary:
    """Write the report atomically to ``path``."""
    import os

    page, summary = build_report(study, storage_url=storage_url)
    out = Path(path)
    if out.is_dir():
        raise AutomlError(f"{out} is a folder; give a file name such as report.html")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(page, encoding="utf-8")
        os.replace(tmp, out)
    except OSError as exc:
        raise AutomlError(f"cannot write {out}: {exc.strerror}") from None
    finally:
        if tmp.exists():
            tmp.unlink()
    summary.path = out
    summary.n_bytes = out.stat().st_size
    return summary


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="automl">
<title>{title}</title>
<style>
body {{ font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto;
       max-width: 1200px; padding: 1rem 2rem; color: #222; }}
h1 {{ margin-bottom: 0.2rem; }}
.made {{ color: #666; margin-top: 0; }}
nav {{ margin: 0.5rem 0 1rem; line-height: 1.8; }}
nav a {{ color: #1f5fa8; text-decoration: none; }}
section {{ border-top: 1px solid #ddd; padding: 0.5rem 0 1rem; }}
table {{ border-collapse: collapse; margin: 0.5rem 0; font-size: 0.9rem; }}
th, td {{ border: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left;
          vertical-align: top; }}
th {{ background: #f3f5f8; }}
table.kv thead {{ display: none; }}
table.wide {{ display: block; overflow-x: auto; }}
pre {{ background: #f6f8fa; padding: 0.8rem; overflow-x: auto; font-size: 0.85rem; }}
.cols {{ display: flex; gap: 2rem; flex-wrap: wrap; }}
.note {{ color: #666; font-style: italic; }}
</style>
<script type="text/javascript">{plotlyjs}</script>
</head>
<body>
<h1>{heading}</h1>
<p class="made">automl study report, made {made}</p>
<nav>{nav}</nav>
{sections}
</body>
</html>
"""
