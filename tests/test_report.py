"""The HTML report: one offline file, every section, and plots that render in Chromium."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import optuna
import pytest
from browser import CHROMIUM, run_chromium
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from typer.testing import CliRunner

from automl.cli import app
from automl.report import build_report, summary_section, write_report

runner = CliRunner()
SPACE = "name: rep\ndata: {dataset: iris}\nobjective: val_accuracy\n"


def _trial(i: int, state: TrialState, values: list[float] | None, **attrs: Any) -> Any:
    params = {
        "optimizer": ["adam", "sgd"][i % 2],
        "lr": 10 ** -(1 + i % 3),
        "hidden_units": 16 + 8 * i,
    }
    dists = {
        "optimizer": CategoricalDistribution(["adam", "sgd"]),
        "lr": FloatDistribution(1e-4, 1.0, log=True),
        "hidden_units": IntDistribution(8, 512),
    }
    curve = {e: (values[0] if values else 0.5) * (e + 1) / 3 for e in range(3)}
    return create_trial(
        state=state,
        values=values,
        params=params,
        distributions=dists,
        user_attrs={"val_loss": 0.3 + i / 10, "n_params": 100 * (i + 1), **attrs},
        intermediate_values=curve if state != TrialState.FAIL else {},
    )


def make_study(url: str, *, n_complete: int = 5, multi: bool = False) -> optuna.Study:
    directions = ["maximize", "minimize"] if multi else ["maximize"]
    study = optuna.create_study(study_name="rep", storage=url, directions=directions)
    study.set_metric_names(["val_accuracy", "n_params"] if multi else ["val_accuracy"])
    study.set_user_attr("space", SPACE)
    for i in range(n_complete):
        values = [0.5 + 0.08 * i, 100.0 * (5 - i) ** 2] if multi else [0.5 + 0.08 * (i % 4)]
        study.add_trial(_trial(i, TrialState.COMPLETE, values))
    for i in range(2):
        study.add_trial(
            _trial(10 + i, TrialState.FAIL, None, fail_reason="out of memory: CUDA ran dry")
        )
    study.add_trial(_trial(20, TrialState.FAIL, None, fail_reason="ValueError: bad shape"))
    if not multi:
        study.add_trial(
            _trial(30, TrialState.PRUNED, None, prune_reason="pruned at epoch 2 with val=0.1")
        )
    return study


def _plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return str(get_plotlyjs())


def _plotly_js_head() -> str:
    return _plotly_js()[:200]


def test_report_is_one_offline_file_with_every_section(storage_url: str, tmp_path: Path) -> None:
    study = make_study(storage_url)
    summary = write_report(study, tmp_path / "r.html", storage_url=storage_url)
    page = (tmp_path / "r.html").read_text()
    assert page.count(_plotly_js_head()) == 1  # plotly.js inlined exactly once
    assert not re.search(r"<script[^>]+src=", page)  # nothing fetched from the network
    # plotly.js names its CDN once, as a default for geo maps; the report adds no link
    assert page.count("cdn.plot.ly") == _plotly_js().count("cdn.plot.ly")
    for title in (
        "Summary",
        "Best trial (#3)",
        "Optimization history",
        "Parameter importances",
        "Parallel coordinates",
        "Slice",
        "Learning curves",
        "Failures",
    ):
        assert f"<h2>{title}</h2>" in page, title
    assert summary.n_plots == 6 and not summary.skipped  # history..curves, timeline
    assert page.count('class="plotly-graph-div"') == summary.n_plots
    # failures grouped by reason, with counts
    assert re.search(r"<td>2</td><td>out of memory: CUDA ran dry</td>", page)
    assert re.search(r"<td>1</td><td>ValueError: bad shape</td>", page)
    assert re.search(r"<td>1</td><td>pruned at epoch 2</td>", page)
    # summary counts and the space file
    assert re.search(r"<td>  complete</td><td>5</td>", page)
    assert re.search(r"<td>  fail</td><td>3</td>", page)
    assert "objective: val_accuracy" in page
    assert "<td>hidden_units</td><td>40</td>" in page  # trial 3's parameters


def test_report_falls_back_when_a_plot_cannot_be_drawn(storage_url: str) -> None:
    study = make_study(storage_url, n_complete=1)
    page, summary = build_report(study, storage_url=storage_url)
    assert "Parameter importances: needs at least 2 complete trials" in summary.skipped
    assert "Not shown: needs at least 2 complete trials." in page
    assert "Slice: no parameter varies across the trials" in summary.skipped
    assert summary.n_plots == 3  # history, learning curves, timeline


def test_report_of_a_study_without_complete_trials(storage_url: str) -> None:
    study = optuna.create_study(study_name="empty", storage=storage_url)
    study.add_trial(
        create_trial(
            state=TrialState.FAIL,
            user_attrs={"fail_reason": "boom"},
            intermediate_values={0: 0.4, 1: 0.5},  # it failed after two epochs
        )
    )
    page, summary = build_report(study)
    assert "No complete trial yet." in page
    assert "Optimization history: needs at least one complete trial" in summary.skipped
    # Optuna draws no failed trial's curve: said, not an empty plot.
    assert (
        "Learning curves: no complete, pruned or running trial reported per-epoch values"
        in summary.skipped
    )
    assert "<td>1</td><td>boom</td>" in page


def test_report_for_several_objectives_has_a_pareto_front(storage_url: str) -> None:
    study = make_study(storage_url, multi=True)
    page, summary = build_report(study)
    assert "<h2>Pareto front</h2>" in page
    assert "<h2>Optimization history: n_params</h2>" in page
    assert "<h2>Pareto front trials</h2>" in page
    assert "Pareto front" not in " ".join(summary.skipped)
    assert summary.n_plots >= 7  # 2 histories, 2 importances, parallel, slice, pareto, ...


def test_report_never_shows_a_password(storage_url: str) -> None:
    study = make_study(storage_url)
    study.set_user_attr("space", SPACE + "# mirror: postgresql://me:hunter2@db/x\n")
    section = summary_section(study, "postgresql+psycopg://me:hunter2@db.example/automl")
    assert "hunter2" not in section.body
    assert "postgresql+psycopg://me:***@db.example/automl" in section.body
    page, _ = build_report(study, storage_url="postgresql+psycopg://me:hunter2@db/x")
    assert "hunter2" not in page


def test_report_cli(storage_url: str, tmp_path: Path) -> None:
    make_study(storage_url)
    out = tmp_path / "sub" / "study.html"
    result = runner.invoke(app, ["report", "rep", "--storage", storage_url, "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert out.stat().st_size > 1_000_000  # plotly.js itself is several MB
    assert "6 plots" in result.stdout
    missing = runner.invoke(app, ["report", "nope", "--storage", storage_url, "-o", str(out)])
    assert missing.exit_code == 2
    assert "no study named 'nope'" in missing.stderr


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_report_renders_in_a_real_browser(storage_url: str, tmp_path: Path) -> None:
    study = make_study(storage_url)
    path = tmp_path / "r.html"
    summary = write_report(study, path)
    dom = run_chromium("--dump-dom", path.as_uri()).stdout
    # every plot div was drawn by plotly.js (offline: the file is all it had)
    assert dom.count('class="plotly-graph-div') == summary.n_plots
    assert dom.count('class="main-svg"') >= summary.n_plots
    assert "Hyperparameter Importances" in dom
    assert "Intermediate Values Plot" in dom
    shot = tmp_path / "shot.png"
    run_chromium("--window-size=1280,3000", f"--screenshot={shot}", path.as_uri())
    assert _distinct_colours(shot) > 20  # not a blank page


def _distinct_colours(png: Path) -> int:
    """How many distinct pixel byte values a PNG holds (a blank page has one or two)."""
    import struct
    import zlib

    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat = 8, b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    return len(set(zlib.decompress(idat)))


def test_importances_of_several_objectives_rank_each_in_its_own_direction() -> None:
    """Optuna's importance evaluator takes a custom target as one to minimise: a
    maximised objective (accuracy) must be negated, or its importances explain the worst
    trials."""
    import optuna
    from optuna.study import StudyDirection

    from automl.report import _minimised

    trial = optuna.trial.create_trial(values=[0.9, 1500.0], params={}, distributions={})
    assert _minimised(0, StudyDirection.MAXIMIZE)(trial) == -0.9
    assert _minimised(1, StudyDirection.MINIMIZE)(trial) == 1500.0


def test_plots_colour_a_pareto_study_by_rank_rank_the_slice_and_count_epochs_from_one() -> None:
    """Several objectives: parallel coordinates by Pareto rank (a custom target drew the
    best near-white); the slice keeps the most important parameters and names the rest;
    learning curves start at epoch 1, as the tables and 'pruned at epoch N' do."""
    import warnings

    from automl.report import MAX_SLICE_PARAMS, _plots

    warnings.simplefilter("ignore")
    pareto = optuna.create_study(directions=["maximize", "minimize"])
    pareto.optimize(lambda t: (t.suggest_float("x", 0, 1), t.suggest_float("y", 0, 1)), n_trials=8)
    plots = {title: (make, why) for title, make, why in _plots(pareto)}
    fig = plots["Parallel coordinates"][0]()  # type: ignore[misc]
    assert fig.data[-1].marker.colorbar.title.text == "Pareto Rank"

    names = [f"p{i}" for i in range(MAX_SLICE_PARAMS + 2)]
    single = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))

    def objective(t: optuna.Trial) -> float:
        values = {n: t.suggest_float(n, 0, 1) for n in names}
        for step in range(3):
            t.report(values["p9"] + step, step)
        return 10 * values["p9"] + 0.01 * values["p0"]  # the last one matters most

    single.optimize(objective, n_trials=30)
    plots = {title: (make, why) for title, make, why in _plots(single)}
    make, why = plots["Slice"]
    fig = make()  # type: ignore[misc]
    shown = [ax.title.text for ax in fig.select_xaxes()]
    assert len(shown) == MAX_SLICE_PARAMS and "p9" in shown
    assert why.startswith("Not shown here (the least important): ") and "p9" not in why
    curves = plots["Learning curves"][0]()  # type: ignore[misc]
    assert min(min(trace.x) for trace in curves.data if trace.x) == 1
    assert curves.layout.xaxis.title.text == "Epoch"
