"""Reading a study: show (fits 80 columns), best, export. Synthetic studies: no training."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState, create_trial
from rich.console import Console
from typer.testing import CliRunner

from automl.cli import app
from automl.results import (
    display_params,
    export_trials,
    key_params,
    render_trials_table,
    trial_rows,
)

runner = CliRunner()

DISTS = {
    "optimizer": CategoricalDistribution(["adam", "sgd"]),
    "adam_lr": FloatDistribution(1e-5, 1e-1, log=True),
    "sgd_lr": FloatDistribution(1e-3, 1.0, log=True),
    "sgd_momentum": FloatDistribution(0.0, 0.99),
    "loss": CategoricalDistribution(["cross_entropy", "mse"]),
    "batch_size": CategoricalDistribution([16, 32, 64]),
    "hidden_units": IntDistribution(16, 512, log=True),
    "n_layers": IntDistribution(1, 4),
}
LONG_REASON = (
    "RuntimeError: CUDA out of memory. Tried to allocate 20.00 GiB (GPU 0; 15.78 GiB total "
    "capacity; 3.21 GiB already allocated) while training the fourth layer of the model"
)


def _params(i: int) -> dict[str, Any]:
    opt = "adam" if i % 2 == 0 else "sgd"
    params: dict[str, Any] = {"optimizer": opt}
    if opt == "adam":
        params["adam_lr"] = 10 ** -(1 + i % 4)
    else:
        params["sgd_lr"] = 0.5 / (i + 1)
        params["sgd_momentum"] = 0.1 * (i % 9)
    params.update(
        loss=["cross_entropy", "mse"][i % 2],
        batch_size=[16, 32, 64][i % 3],
        hidden_units=16 * (i + 1),
        n_layers=1 + i % 4,
    )
    return params


def _trial(
    i: int, state: TrialState, value: float | None = None, **attrs: Any
) -> optuna.trial.FrozenTrial:
    params = _params(i)
    return create_trial(
        state=state,
        value=value,
        params=params,
        distributions={k: DISTS[k] for k in params},
        user_attrs={"epochs_run": 3, "val_accuracy": value, "n_params": 100 + i, **attrs},
        intermediate_values={0: (value or 0.5) - 0.1, 1: value or 0.5}
        if state == TrialState.COMPLETE
        else {},
    )


def make_study(url: str, name: str = "synthetic") -> optuna.Study:
    """Six complete trials (values 0.5..0.9, trial 3 best), two failed, one pruned."""
    study = optuna.create_study(study_name=name, storage=url, direction="maximize")
    study.set_metric_names(["val_accuracy"])
    study.set_user_attr("space", "name: synthetic\ndata: {dataset: iris}\n")
    values = [0.5, 0.7, 0.6, 0.9, 0.8, 0.55]
    for i, v in enumerate(values):
        study.add_trial(_trial(i, TrialState.COMPLETE, v))
    study.add_trial(_trial(6, TrialState.FAIL, fail_reason=LONG_REASON))
    study.add_trial(_trial(7, TrialState.FAIL, fail_reason=LONG_REASON))
    study.add_trial(
        _trial(8, TrialState.PRUNED, prune_reason="pruned at epoch 2 with val_accuracy=0.3")
    )
    return study


@pytest.fixture
def study_url(storage_url: str) -> str:
    make_study(storage_url)
    return storage_url


@pytest.fixture(autouse=True)
def _eighty_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "80")


def _table_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def test_show_fits_80_columns_and_keeps_one_line_per_trial(study_url: str) -> None:
    result = runner.invoke(app, ["show", "synthetic", "--storage", study_url])
    assert result.exit_code == 0, result.stderr
    lines = _table_lines(result.stdout)
    assert max(len(line) for line in lines) <= 80, result.stdout
    header = next(line for line in lines if line.startswith("#"))
    for column in ("state", "val_accuracy", "epochs", "time", "optimizer", "note"):
        assert column in header.split(), header
    rows = [line for line in lines if line[:1].isdigit()]
    assert len(rows) == 9  # every trial on exactly one line: the note is cut, not wrapped
    numbers = [int(line.split()[0]) for line in rows]
    assert numbers[:6] == [3, 4, 1, 2, 5, 0]  # complete, best value first
    assert set(numbers[6:]) == {6, 7, 8}
    failed = [line for line in rows if line.split()[1] == "fail"]
    assert len(failed) == 2
    assert all("RuntimeError: CUDA" in line and line.rstrip().endswith("…") for line in failed)
    assert "not shown:" in result.stdout  # parameters that did not fit are named


def test_show_filters_by_state_and_limits(study_url: str) -> None:
    result = runner.invoke(
        app, ["show", "synthetic", "--storage", study_url, "--state", "complete", "--limit", "2"]
    )
    assert result.exit_code == 0, result.stderr
    rows = [line for line in _table_lines(result.stdout) if line[:1].isdigit()]
    assert [int(r.split()[0]) for r in rows] == [3, 4]
    assert "(4 more; use --limit)" in result.stdout
    pruned = runner.invoke(app, ["show", "synthetic", "--storage", study_url, "--state", "pruned"])
    rows = [line for line in _table_lines(pruned.stdout) if line[:1].isdigit()]
    assert [r.split()[:2] for r in rows] == [["8", "pruned"]]
    assert "pruned at epoch 2" in pruned.stdout
    bad = runner.invoke(app, ["show", "synthetic", "--storage", study_url, "--state", "done"])
    assert bad.exit_code == 2
    assert "--state must be one of" in bad.stderr


def test_show_json_is_one_document(study_url: str) -> None:
    result = runner.invoke(app, ["show", "synthetic", "--storage", study_url, "--json"])
    assert result.exit_code == 0
    docs = json.loads(result.stdout)
    assert [d["number"] for d in docs[:2]] == [3, 4]
    assert docs[0]["params"]["optimizer"] == "sgd"
    assert docs[0]["value"] == pytest.approx(0.9)


def test_trial_rows_fit_any_width(study_url: str) -> None:
    study = optuna.load_study(study_name="synthetic", storage=study_url)
    trials = study.get_trials()
    wide_header, _, wide_left = trial_rows(study, trials, width=200)
    narrow_header, rows, narrow_left = trial_rows(study, trials, width=60)
    assert len(wide_header) > len(narrow_header)
    assert set(narrow_left) > set(wide_left)
    assert all(len(r) == len(narrow_header) for r in rows)
    assert narrow_header[:2] == ["#", "state"] and narrow_header[-1] == "note"


def test_display_params_merge_each_optimizers_lr() -> None:
    adam = _trial(0, TrialState.COMPLETE, 0.5)
    sgd = _trial(1, TrialState.COMPLETE, 0.6)
    assert display_params(adam)["lr"] == pytest.approx(0.1)
    assert display_params(sgd)["lr"] == pytest.approx(0.25)
    assert "adam_lr" not in display_params(adam) and "sgd_lr" not in display_params(sgd)
    assert "sgd_momentum" not in key_params([adam, sgd])  # one value: nothing to compare
    order = key_params([adam, sgd, _trial(3, TrialState.COMPLETE, 0.7)])
    assert order[:2] == ["optimizer", "lr"]  # the space's order; in fewer trials: last
    assert order[-1] == "sgd_momentum"


def test_best_prints_parameters_and_metrics(study_url: str) -> None:
    result = runner.invoke(app, ["best", "synthetic", "--storage", study_url])
    assert result.exit_code == 0, result.stderr
    out = result.stdout
    assert "best trial #3" in out and "val_accuracy = 0.9" in out
    assert "sgd_momentum" in out and "hidden_units" in out and "n_params" in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_best_json_has_the_contract_fields(study_url: str) -> None:
    result = runner.invoke(app, ["best", "synthetic", "--storage", study_url, "--json"])
    doc = json.loads(result.stdout)
    assert {"study", "number", "value", "params", "user_attrs"} <= set(doc)
    assert doc["number"] == 3 and doc["value"] == pytest.approx(0.9)
    assert doc["params"]["hidden_units"] == 64


def test_best_for_several_objectives_lists_the_front(storage_url: str) -> None:
    study = optuna.create_study(
        study_name="pareto", storage=storage_url, directions=["maximize", "minimize"]
    )
    study.set_metric_names(["val_accuracy", "n_params"])
    for i, values in enumerate([(0.9, 500.0), (0.8, 100.0), (0.7, 300.0)]):
        params = _params(i)
        study.add_trial(
            create_trial(
                values=list(values),
                params=params,
                distributions={k: DISTS[k] for k in params},
            )
        )
    text = runner.invoke(app, ["best", "pareto", "--storage", storage_url])
    assert text.exit_code == 0, text.stderr
    assert "2 trial(s) on the Pareto front" in text.stdout
    rows = [line.split()[0] for line in text.stdout.splitlines() if line[:1].isdigit()]
    assert sorted(rows) == ["0", "1"]  # trial 2 is dominated by trial 1
    doc = json.loads(
        runner.invoke(app, ["best", "pareto", "--storage", storage_url, "--json"]).stdout
    )
    assert sorted(t["number"] for t in doc["best_trials"]) == [0, 1]
    assert doc["number"] == 0 and doc["values"] == [0.9, 500.0]  # best on val_accuracy
    assert doc["params"]["optimizer"] == "adam"
    assert doc["objectives"] == ["val_accuracy", "n_params"]


def test_export_csv_has_one_row_per_trial_with_everything(study_url: str) -> None:
    study = optuna.load_study(study_name="synthetic", storage=study_url)
    rows = list(csv.DictReader(io.StringIO(export_trials(study, fmt="csv"))))
    assert len(rows) == 9
    first = rows[0]
    for col in (
        "number",
        "state",
        "value_val_accuracy",
        "params_optimizer",
        "params_sgd_momentum",
        "user_attrs_fail_reason",
        "user_attrs_n_params",
        "duration_seconds",
    ):
        assert col in first, col
    by_number = {int(r["number"]): r for r in rows}
    assert by_number[3]["value_val_accuracy"] == "0.9"
    assert by_number[6]["state"] == "fail" and by_number[6]["value_val_accuracy"] == ""
    assert by_number[6]["user_attrs_fail_reason"] == LONG_REASON
    assert by_number[0]["params_sgd_momentum"] == ""  # adam trials have no momentum


def test_export_cli_json_to_file(study_url: str, tmp_path: Any) -> None:
    out = tmp_path / "trials.json"
    result = runner.invoke(
        app, ["export", "synthetic", "--storage", study_url, "--format", "json", "-o", str(out)]
    )
    assert result.exit_code == 0, result.stderr
    doc = json.loads(out.read_text())
    assert doc["study"] == "synthetic"
    assert len(doc["trials"]) == 9
    assert {"params", "values", "state", "user_attrs", "duration_seconds"} <= set(doc["trials"][0])
    bad = runner.invoke(app, ["export", "synthetic", "--storage", study_url, "--format", "xml"])
    assert bad.exit_code == 2


def test_best_of_a_study_without_a_complete_trial_says_what_its_trials_are(
    storage_url: str,
) -> None:
    import optuna
    from typer.testing import CliRunner

    from automl.cli import app

    study = optuna.create_study(study_name="pruned", storage=storage_url)
    for _ in range(3):
        study.tell(study.ask(), state=optuna.trial.TrialState.PRUNED)
    study.tell(study.ask(), state=optuna.trial.TrialState.FAIL)
    runner = CliRunner()
    for args in (["best", "pruned"], ["retrain", "pruned", "-o", "m.pt"]):
        result = runner.invoke(app, [*args, "--storage", storage_url])
        assert result.exit_code == 2
        assert (
            "study 'pruned' has no complete trial: its 4 trial(s) are 1 fail, 3 pruned; see why "
            "with automl show pruned" in " ".join(result.stderr.split())
        )
    for number, words in ((0, "was pruned"), (3, "failed")):
        one = runner.invoke(
            app,
            ["retrain", "pruned", "--trial", str(number), "-o", "m.pt", "--storage", storage_url],
        )
        assert one.exit_code == 2
        assert f"trial #{number} {words}, not complete" in " ".join(one.stderr.split())


def test_parameters_left_out_as_constant_are_named_under_the_table(study_url: str) -> None:
    """Columns are parameters that vary; one that does not (a single trial's, or adam in
    every best trial) was dropped without a word."""
    study = optuna.load_study(study_name="synthetic", storage=study_url)
    sgd_trials = [t for t in study.get_trials() if t.params.get("optimizer") == "sgd"][:1]
    console = Console(width=80, record=True)
    render_trials_table(console, study, sgd_trials, title="one")
    text = console.export_text()
    assert "parameters: optimizer sgd, lr" in " ".join(text.split())
    adam = [t for t in study.get_trials() if t.params.get("optimizer") == "adam"]
    console = Console(width=80, record=True)
    render_trials_table(console, study, adam, title="adam")
    assert "the same in every row: optimizer adam" in " ".join(console.export_text().split())


def test_a_trial_failed_without_a_reason_is_named_as_killed() -> None:
    """The heartbeat check fails a killed process's trial without a reason: say so."""
    from automl.results import NO_REASON, failure_reasons, trial_note

    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    failed = optuna.trial.create_trial(
        state=optuna.trial.TrialState.FAIL, user_attrs={"fail_reason": "interrupted"}
    )
    study.add_trial(failed)
    assert trial_note(study.trials[0]) == "no heartbeat (killed?)"
    assert trial_note(study.trials[1]) == "interrupted"
    assert failure_reasons(study) == {NO_REASON: 1, "interrupted": 1}


def test_format_value_writes_counts_in_full() -> None:
    from automl.results import format_value

    assert format_value(32791.0) == "32791"  # n_params as an objective was 3.279e+04
    assert format_value(1.0) == "1"
    assert format_value(0.98765) == "0.9877"
    assert format_value(1.5e-7) == "1.5e-07"
    assert format_value([0.5, 120.0]) == "0.5, 120"
