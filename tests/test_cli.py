"""The CLI contract: runs write standard Optuna studies, JSON shapes, exit codes, startup."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import optuna
import pytest
from typer.testing import CliRunner

from automl.cli import app

runner = CliRunner()


def _run(*args: str) -> object:
    return runner.invoke(app, list(args))


def test_run_writes_a_standard_optuna_study(tiny_space: Path, storage_url: str) -> None:
    result = _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "4")
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 4
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert complete, "no trial completed"
    for t in complete:
        assert t.params["optimizer"] in ("adam", "sgd")
        assert t.params["batch_size"] in (16, 32)
        assert 0.0 <= t.value <= 1.0
        attrs = t.user_attrs
        for key in (
            "train_loss",
            "val_loss",
            "val_accuracy",
            "val_f1",
            "n_params",
            "epochs_run",
            "train_seconds",
            "device",
            "seed",
        ):
            assert key in attrs, key
        assert attrs["device"] == "cpu"
        assert attrs["val_accuracy"] == pytest.approx(t.value, abs=1e-6)
        assert attrs["epochs_run"] == 3
        assert sorted(t.intermediate_values) == [0, 1, 2]
    assert study.user_attrs["space_hash"]
    assert "dataset: iris" in study.user_attrs["space"]
    assert study.metric_names == ["val_accuracy"]
    assert "best trials of 'tiny'" in result.stdout


def test_optuna_cli_lists_the_study(tiny_space: Path, storage_url: str) -> None:
    assert _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "1").exit_code == 0
    optuna_cli = Path(sys.executable).parent / "optuna"
    out = subprocess.run(
        [str(optuna_cli), "studies", "--storage", storage_url, "-f", "json"],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = json.loads(out.stdout)
    assert [r["name"] for r in rows] == ["tiny"]


def test_run_json_and_best_json_shapes(tiny_space: Path, storage_url: str) -> None:
    result = _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "3", "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)  # stdout holds the document and nothing else
    assert doc["study"] == "tiny"
    assert doc["n_complete"] + doc["n_pruned"] + doc["n_failed"] == 3
    best = _run("best", "tiny", "--storage", storage_url, "--json")
    assert best.exit_code == 0
    bdoc = json.loads(best.stdout)
    assert {"study", "number", "value", "params", "user_attrs"} <= set(bdoc)
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert bdoc["number"] == study.best_trial.number
    assert bdoc["value"] == pytest.approx(study.best_value)
    assert bdoc["params"] == study.best_trial.params
    assert doc["best"]["number"] == bdoc["number"]


def test_studies_json_and_show_and_export(tiny_space: Path, storage_url: str) -> None:
    assert _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "3").exit_code == 0
    rows = json.loads(_run("studies", "--storage", storage_url, "--json").stdout)
    assert len(rows) == 1
    row = rows[0]
    assert row["name"] == "tiny"
    assert row["direction"] == "maximize"
    assert row["n_trials"] == 3
    study = optuna.load_study(study_name="tiny", storage=storage_url)
    assert row["best_value"] == pytest.approx(study.best_value)
    shown = json.loads(_run("show", "tiny", "--storage", storage_url, "--json").stdout)
    assert len(shown) == 3
    assert shown[0]["number"] == study.best_trial.number  # best first
    cut = _run("show", "tiny", "--storage", storage_url, "--json", "--limit", "2")
    assert len(json.loads(cut.stdout)) == 2  # stdout stays JSON; stderr says what is left
    assert "(1 more trials not shown; use --limit)" in cut.stderr
    csv_text = _run("export", "tiny", "--storage", storage_url, "--format", "csv").stdout
    lines = csv_text.strip().splitlines()
    assert len(lines) == 4
    assert "params_optimizer" in lines[0] and "user_attrs_val_accuracy" in lines[0]
    exported = json.loads(
        _run("export", "tiny", "--storage", storage_url, "--format", "json").stdout
    )
    assert len(exported["trials"]) == 3


def test_delete_needs_yes(tiny_space: Path, storage_url: str) -> None:
    assert _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "1").exit_code == 0
    refused = _run("delete", "tiny", "--storage", storage_url)
    assert refused.exit_code == 2
    assert "--yes" in refused.stderr
    from automl.checkpoints import study_checkpoint_dir

    kept = study_checkpoint_dir(storage_url, "tiny")
    assert list(kept.glob("*.weights.pt"))  # the best trial's weights
    assert _run("delete", "tiny", "--storage", storage_url, "--yes").exit_code == 0
    assert optuna.get_all_study_names(storage_url) == []
    assert not kept.exists()  # a new study of that name must not find them


def test_exit_codes_for_bad_file_and_unknown_study(tmp_path: Path, storage_url: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: iris}\nspace: {dropout: {low: 0.6, high: 0.5}}\n")
    result = _run("run", str(bad), "--storage", storage_url)
    assert result.exit_code == 2
    assert "space.dropout: low must be <= high, got low=0.6 high=0.5" in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1
    missing = _run("best", "nope", "--storage", storage_url)
    assert missing.exit_code == 2
    assert "no study named 'nope'" in missing.stderr


def test_space_check_and_show(tiny_space: Path, tmp_path: Path) -> None:
    ok = _run("space", "check", str(tiny_space))
    assert ok.exit_code == 0 and "valid" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {dataset: iris}\nspace: {dropout: 2.0, batch_size: 0}\n")
    result = _run("space", "check", str(bad))
    assert result.exit_code == 2
    assert result.stderr.count("error:") == 2
    shown = _run("space", "show", str(tiny_space))
    assert shown.exit_code == 0
    assert "sgd_momentum" in shown.stdout and "optimizer = sgd" in shown.stdout
    assert "searched parameter(s)" in ok.stdout and "fixed" not in ok.stdout
    several = tmp_path / "several.yaml"
    several.write_text(
        "data: {dataset: iris}\nobjective: [val_accuracy, n_params]\n"
        "space: {optimizer: {adam: {lr: 0.01}}, dropout: {low: 0, high: 0.5}}\n"
    )
    checked = _run("space", "check", str(several))
    assert "(1 searched parameter(s), 1 fixed, objective val_accuracy, n_params)" in " ".join(
        checked.stdout.split()
    )
    assert "pruner: none (several objectives)" in _run("space", "show", str(several)).stdout


def test_space_check_and_run_refuse_what_would_fail_every_trial(
    tmp_path: Path, storage_url: str
) -> None:
    """Sampler and pruner options of the wrong type or below their minimum failed every
    trial (TypeError, ZeroDivisionError; exit 1, the study written); `space check` said
    valid to those and to data `run` refuses. Both now refuse them, naming the file."""
    rows = "".join(f"{i},{i % 2}\n" for i in range(20))
    (tmp_path / "d.csv").write_text("a,label\n" + rows)
    cases = [
        (
            "sampler: {name: tpe, n_startup_trials: abc}",
            "study.sampler.n_startup_trials: must be a whole number for 'tpe', got 'abc'",
        ),
        (
            "sampler: {name: tpe, multivariate: maybe}",
            "study.sampler.multivariate: must be true or false",
        ),
        (
            "pruner: {name: hyperband, min_resource: 0}",
            "study.pruner.min_resource: must be at least 1, got 0",
        ),
        (
            "pruner: {name: percentile, percentile: 150}",
            "study.pruner: bad option for 'percentile'",
        ),
    ]
    for study, message in cases:
        space = tmp_path / "s.yaml"
        space.write_text(f"data: {{dataset: iris}}\nstudy: {{{study}}}\nspace: {{dropout: 0.1}}\n")
        for args in (["space", "check", str(space)], ["run", str(space), "--storage", storage_url]):
            result = _run(*args)
            assert result.exit_code == 2, (args, result.output)
            assert f"s.yaml: {message}" in " ".join(result.stderr.split()), result.stderr
    assert not Path(storage_url.removeprefix("sqlite:///")).exists()  # nothing written
    data = tmp_path / "data.yaml"
    data.write_text(
        f"data: {{path: {tmp_path / 'd.csv'}, target: Label}}\nspace: {{dropout: 0.1}}\n"
    )
    result = _run("space", "check", str(data))
    assert result.exit_code == 2
    assert "target column 'Label' is not in the file; did you mean 'label'?" in result.stderr
    fine = tmp_path / "fine.yaml"
    fine.write_text(
        "data: {dataset: iris}\nstudy: {pruner: {name: hyperband, max_resource: auto}}\n"
        "space: {dropout: 0.1}\n"
    )
    assert _run("space", "check", str(fine)).exit_code == 0


def test_space_new_writes_a_valid_starter(tmp_path: Path) -> None:
    target = tmp_path / "new.yaml"
    assert _run("space", "new", str(target)).exit_code == 0
    assert _run("space", "check", str(target)).exit_code == 0
    assert _run("space", "new", str(target)).exit_code == 2  # no silent overwrite


def test_run_from_flags_without_a_file(storage_url: str) -> None:
    result = _run(
        "run",
        "--dataset", "iris",
        "--optimizer", "adam,sgd",
        "--loss", "cross_entropy,mse",
        "--lr", "1e-3..1e-1:log",
        "--batch-size", "16,32",
        "--hidden-units", "8..32:log",
        "--param", "dropout=0..0.3",
        "--epochs", "2",
        "--objective", "val_accuracy",
        "--storage", storage_url,
        "--n-trials", "3",
        "--study", "flags",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    study = optuna.load_study(study_name="flags", storage=storage_url)
    assert len(study.trials) == 3
    for t in study.trials:
        assert 1e-3 <= t.params["lr"] <= 1e-1
        assert 8 <= t.params["hidden_units"] <= 32
        assert 0.0 <= t.params["dropout"] <= 0.3


def test_run_without_space_or_data_is_usage_error() -> None:
    result = _run("run")
    assert result.exit_code == 2
    assert "give a space file" in result.stderr


def test_storage_env_var_and_default(
    tiny_space: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _run("run", str(tiny_space), "--n-trials", "1").exit_code == 0
    assert (tmp_path / "studies" / "automl.db").exists()  # the default, folder created
    env_url = f"sqlite:///{tmp_path / 'env.db'}"
    monkeypatch.setenv("AUTOML_STORAGE", env_url)
    assert _run("run", str(tiny_space), "--n-trials", "1").exit_code == 0
    assert optuna.get_all_study_names(env_url) == ["tiny"]


def test_help_does_not_import_torch_sklearn_or_pandas() -> None:
    code = (
        "import sys\n"
        "from automl.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('torch', 'sklearn', 'pandas', 'optuna') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "automl run" in out.stdout or "run" in out.stdout


def test_the_process_ends_even_when_closing_up_hangs(tmp_path: Path) -> None:
    """The console script's last step (closing logs and connections) cannot keep the
    process alive: after EXIT_GRACE_SECONDS it ends with the command's own status."""
    code = (
        "import time\n"
        "import automl.cli as cli, automl.storage as storage\n"
        "cli.EXIT_GRACE_SECONDS = 0.5\n"
        "storage.close_storages = lambda: time.sleep(3600)\n"
        "cli.entry()\n"
    )
    url = f"sqlite:///{tmp_path / 'none.db'}"
    done = subprocess.run(
        [sys.executable, "-c", code, "show", "nosuch", "--storage", url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr  # the command's own status: no such storage
    assert "no study storage" in done.stderr


def test_show_with_no_trial_in_the_state_says_so(tiny_space: Path, storage_url: str) -> None:
    assert _run("run", str(tiny_space), "--storage", storage_url, "--n-trials", "1").exit_code == 0
    shown = _run("show", "tiny", "--state", "fail", "--storage", storage_url)
    assert shown.exit_code == 0
    assert "study 'tiny': no failed trial (of 1)" in shown.stdout


def test_storage_errors_that_reach_the_cli_are_explained() -> None:
    """A study deleted under a run, a gRPC proxy that went away: one readable line."""
    from automl.cli import _explain

    gone = _explain(KeyError("Record does not exist."))
    assert gone.startswith("the study or one of its trials is no longer in the storage")

    class _InactiveRpcError(Exception):  # grpc's, as far as the CLI looks at it
        def code(self) -> Any:
            import enum

            return enum.Enum("StatusCode", "UNAVAILABLE").UNAVAILABLE

        def details(self) -> str:
            return "failed to connect to all addresses"

    line = _explain(_InactiveRpcError("<_InactiveRpcError of RPC that terminated with:\n..."))
    assert line == (
        "the gRPC storage proxy stopped answering (UNAVAILABLE: failed to connect to all "
        "addresses); is `automl proxy` still running?"
    )
    assert _explain(ValueError("bad\nmore")) == (
        "ValueError: bad (run with --debug for the traceback)"
    )


def test_a_param_given_twice_on_the_command_line_is_refused(storage_url: str) -> None:
    for args in (
        ["--param", "dropout=0.1", "--param", "dropout=0.2"],
        ["--lr", "0.01", "--param", "lr=0.1"],
    ):
        result = _run("run", "--dataset", "iris", *args, "--storage", storage_url)
        assert result.exit_code == 2
        assert "given twice (or with its own flag); keep one" in result.stderr
    assert not Path(storage_url.removeprefix("sqlite:///")).exists()


def test_space_new_never_writes_over_a_study_storage(tmp_path: Path, storage_url: str) -> None:
    db = tmp_path / "j.db"
    optuna.create_study(storage=f"sqlite:///{db}", study_name="s")
    before = db.read_bytes()
    result = _run("space", "new", str(db), "--force")
    assert result.exit_code == 2 and "is a study storage, not a space file" in result.stderr
    assert db.read_bytes() == before


def test_names_and_paths_print_as_typed_and_studies_never_cuts_a_name(
    tiny_space: Path, storage_url: str, tmp_path: Path
) -> None:
    """Rich read '[/v2]' in a study name as a closing tag (exit 1 after a successful run,
    and `studies` failed for the whole storage) and '[bold]' as a style."""
    name = "exp [/v2] [bold] :smile: long"
    ran = _run("run", str(tiny_space), "--study", name, "--n-trials", "1", "--storage", storage_url)
    assert ran.exit_code == 0, ran.output
    listed = runner.invoke(app, ["studies", "--storage", storage_url], env={"COLUMNS": "80"})
    assert listed.exit_code == 0, listed.output
    assert name in listed.stdout  # whole, on one line, at 80 columns
    shown = _run("show", name, "--storage", storage_url)
    assert shown.exit_code == 0 and f"trials of '{name}'" in shown.stdout
    out = tmp_path / "run[v2].pt"
    saved = _run("retrain", name, "--storage", storage_url, "-o", str(out))
    assert saved.exit_code == 0 and f"saved {out}" in " ".join(saved.stdout.split())
    gone = _run("delete", name, "--yes", "--storage", storage_url)
    assert gone.exit_code == 0 and f"deleted study '{name}'" in gone.stdout


def test_run_json_writes_its_document_when_every_trial_fails(
    tmp_path: Path, storage_url: str
) -> None:
    space = tmp_path / "fail.yaml"
    space.write_text(  # 3e6 x 3e6 weights: every trial fails to allocate, at once
        "data: {dataset: iris}\ntrain: {epochs: 1}\nspace: {hidden_units: 3000000, n_layers: 2}\n"
    )
    result = _run("run", str(space), "--n-trials", "2", "--storage", storage_url, "--json")
    assert result.exit_code == 1
    doc = json.loads(result.stdout)
    assert doc["n_failed"] == 2 and doc["n_complete"] == 0 and doc["best"] is None
    assert doc["stop_reason"].startswith("every trial failed")
    assert "error: every trial failed" in result.stderr


def test_run_json_writes_its_document_for_bad_data_and_a_repeated_optimizer_flag(
    tmp_path: Path, storage_url: str
) -> None:
    missing = tmp_path / "nosuch.csv"
    result = _run(
        "run", "--data", str(missing), "--target", "y", "--storage", storage_url, "--json"
    )
    assert result.exit_code == 2
    doc = json.loads(result.stdout)
    assert doc["n_complete"] == 0 and "no such data file" in doc["stop_reason"]
    twice = _run("run", "--dataset", "iris", "--optimizer", "adam,adam", "--storage", storage_url)
    assert (
        twice.exit_code == 2
        and "--optimizer: choices repeat a value, got adam,adam" in twice.stderr
    )
