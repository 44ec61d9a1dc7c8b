"""retrain and predict on real (tiny) searches: iris from a CSV with text labels."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from automl.cli import app
from automl.errors import UsageError
from automl.retrain import load_model_file, predict_frame, trial_config
from automl.spaces import TrialConfig, load_space
from automl.studies import RunOptions, load_study, run_study

runner = CliRunner()

SPACE = """\
name: flowers
data:
  path: ../data/flowers.csv
  target: species
  drop: [row_id]
  validation: 0.2
  test: 0.2
model: mlp
train:
  epochs: 6
  patience: 0
objective: val_accuracy
study:
  sampler: random
  pruner: none
  seed: 3
space:
  optimizer:
    adam:
      lr: {low: 1.0e-2, high: 5.0e-2, log: true}
  loss: cross_entropy
  batch_size: 16
  hidden_units: [8, 16]
  n_layers: 1
"""
PARETO = SPACE.replace("name: flowers", "name: flowers-pareto").replace(
    "objective: val_accuracy", "objective: [val_accuracy, n_params]"
)


def _flowers() -> pd.DataFrame:
    from sklearn.datasets import load_iris

    bunch = load_iris(as_frame=True)
    frame = bunch.frame.drop(columns=["target"])
    frame["species"] = np.array(bunch.target_names)[bunch.target]
    frame.insert(0, "row_id", range(len(frame)))
    return frame


class Searched:
    def __init__(self, root: Path, url: str) -> None:
        self.root = root
        self.url = url
        self.frame = _flowers()


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Searched]:
    """One real search of 3 trials (the data path relative to the space file)."""
    root = tmp_path_factory.mktemp("retrain")
    (root / "data").mkdir()
    (root / "spaces").mkdir()
    _flowers().to_csv(root / "data" / "flowers.csv", index=False)
    (root / "spaces" / "flowers.yaml").write_text(SPACE)
    (root / "spaces" / "pareto.yaml").write_text(PARETO)
    url = f"sqlite:///{root / 'studies.db'}"
    old = Path.cwd()
    os.chdir(root / "spaces")
    try:
        for file, name in (("flowers.yaml", "flowers"), ("pareto.yaml", "flowers-pareto")):
            space = load_space(file)
            run_study(space, RunOptions(study_name=name, storage_url=url, n_trials=3, device="cpu"))
    finally:
        os.chdir(old)
    yield Searched(root, url)


def _retrain(searched: Searched, out: Path, *extra: str) -> object:
    return runner.invoke(
        app,
        [
            "retrain",
            "flowers",
            "--storage",
            searched.url,
            "-o",
            str(out),
            "--device",
            "cpu",
            *extra,
        ],
    )


def test_retrain_saves_one_weights_only_file(searched: Searched, tmp_path: Path) -> None:
    out = tmp_path / "models" / "flowers.pt"
    result = _retrain(searched, out)  # run from tmp_path: the data path was stored absolute
    assert result.exit_code == 0, result.stderr
    study = load_study("flowers", searched.url)
    best = study.best_trial
    assert f"trial #{best.number} of 'flowers'" in result.stdout
    assert "trained on 120 rows (train + validation)" in result.stdout  # 150 - 30 test rows
    assert "test split (30 rows): " in result.stdout and "test_accuracy 0." in result.stdout

    doc = torch.load(out, weights_only=True)  # nothing that needs unpickling objects
    assert doc["format"] == "automl-model" and doc["task"] == "classification"
    assert doc["classes"] == ["setosa", "versicolor", "virginica"]
    assert doc["input_shape"] == [4]
    assert doc["preprocessor"]["numeric"] == [c for c in _flowers().columns[1:5]]
    assert len(doc["preprocessor"]["means"]) == 4 and len(doc["preprocessor"]["scales"]) == 4
    assert doc["preprocessor"]["target"] == "species"
    space = load_space(searched.root / "spaces" / "flowers.yaml")
    assert TrialConfig.from_dict(doc["config"]) == trial_config(study, best, space)
    prov = doc["provenance"]
    assert prov["study"] == "flowers" and prov["trial"] == best.number
    assert prov["epochs"] == best.user_attrs["best_epoch"]
    assert prov["params"] == best.params
    assert 0.0 <= prov["test_metrics"]["test_accuracy"] <= 1.0
    assert set(doc["state_dict"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_retrain_is_reproducible_and_json(searched: Searched, tmp_path: Path) -> None:
    first, second = tmp_path / "a.pt", tmp_path / "b.pt"
    assert _retrain(searched, first).exit_code == 0
    result = _retrain(searched, second, "--json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["n_train"] == 120 and doc["n_test"] == 30 and doc["reused"] is False
    assert set(doc["test_metrics"]) == {
        "test_accuracy",
        "test_balanced_accuracy",
        "test_f1",
        "test_loss",
    }
    a = torch.load(first, weights_only=True)["state_dict"]
    b = torch.load(second, weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_retrain_a_chosen_trial_and_bad_choices(searched: Searched, tmp_path: Path) -> None:
    result = _retrain(searched, tmp_path / "t0.pt", "--trial", "0")
    assert result.exit_code == 0, result.stderr
    assert torch.load(tmp_path / "t0.pt", weights_only=True)["provenance"]["trial"] == 0
    missing = _retrain(searched, tmp_path / "t9.pt", "--trial", "9")
    assert missing.exit_code == 2
    assert "no trial #9 (trials: 0..2)" in missing.stderr
    assert not (tmp_path / "t9.pt").exists()
    unknown = runner.invoke(app, ["retrain", "nope", "--storage", searched.url, "-o", "x.pt"])
    assert unknown.exit_code == 2
    no_output = runner.invoke(app, ["retrain", "flowers", "--storage", searched.url])
    assert no_output.exit_code == 2


def test_multi_objective_needs_a_trial(searched: Searched, tmp_path: Path) -> None:
    out = tmp_path / "p.pt"
    result = runner.invoke(
        app, ["retrain", "flowers-pareto", "--storage", searched.url, "-o", str(out)]
    )
    assert result.exit_code == 2
    assert "pick a trial on its Pareto front with --trial N" in result.stderr
    assert "on the Pareto front" in result.stderr  # the front is shown to pick from
    assert not out.exists()
    study = load_study("flowers-pareto", searched.url)
    number = study.best_trials[0].number
    chosen = runner.invoke(
        app,
        [
            "retrain",
            "flowers-pareto",
            "--storage",
            searched.url,
            "-o",
            str(out),
            "--trial",
            str(number),
            "--device",
            "cpu",
        ],
    )
    assert chosen.exit_code == 0, chosen.stderr
    assert torch.load(out, weights_only=True)["provenance"]["values"] == study.trials[number].values


def test_reuse_takes_the_weights_the_search_kept(searched: Searched, tmp_path: Path) -> None:
    study = load_study("flowers", searched.url)
    best = study.best_trial
    kept = best.user_attrs.get("weights_path")
    if kept is None or not Path(kept).is_file():
        pytest.skip("this search kept no weights (checkpoints are off)")
    out = tmp_path / "reused.pt"
    result = _retrain(searched, out, "--reuse")
    assert result.exit_code == 0, result.stderr
    assert "took the weights the search kept" in result.stdout
    saved = torch.load(kept, weights_only=True)["model"]
    doc = torch.load(out, weights_only=True)
    assert doc["provenance"]["reused"] is True
    assert all(torch.equal(saved[k], doc["state_dict"][k]) for k in saved)


def test_reuse_without_kept_weights_is_a_clear_error(searched: Searched, tmp_path: Path) -> None:
    study = load_study("flowers", searched.url)
    others = [t for t in study.trials if t.number != study.best_trial.number]
    trial = next(t for t in others if not Path(t.user_attrs.get("weights_path", "-")).is_file())
    result = _retrain(searched, tmp_path / "r.pt", "--reuse", "--trial", str(trial.number))
    assert result.exit_code == 2
    assert f"kept no weights for trial #{trial.number}" in result.stderr
    assert "without --reuse" in result.stderr


# --------------------------------------------------------------------------- predict


@pytest.fixture(scope="module")
def model_file(searched: Searched, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("model") / "flowers.pt"
    result = runner.invoke(
        app, ["retrain", "flowers", "--storage", searched.url, "-o", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.stderr
    return out


def test_predict_keeps_rows_and_labels(model_file: Path, tmp_path: Path) -> None:
    frame = _flowers().sample(frac=1.0, random_state=0).reset_index(drop=True)
    frame["comment"] = "x"  # an extra column: ignored with a warning
    frame.to_csv(tmp_path / "in.csv", index=False)
    result = runner.invoke(app, ["predict", str(model_file), str(tmp_path / "in.csv")])
    assert result.exit_code == 0, result.stderr
    out = pd.read_csv(io.StringIO(result.stdout))
    assert list(out.columns) == ["prediction"]
    assert len(out) == 150
    assert set(out["prediction"]) <= {"setosa", "versicolor", "virginica"}
    assert (out["prediction"] == frame["species"]).mean() > 0.6  # a trained model, in order
    # One unwrapped line however long the path (a cron log is grepped).
    (line,) = [x for x in result.stderr.splitlines() if "ignoring" in x]
    assert line.startswith("WARNING ") and line.endswith(
        "ignoring 1 column(s) the model does not use: comment"
    )
    # the same rows in another order give the same predictions in that order
    loaded = load_model_file(model_file)
    reordered = predict_frame(loaded, frame.iloc[::-1].reset_index(drop=True)).frame
    assert list(reordered["prediction"]) == list(out["prediction"][::-1])


def test_predict_proba_to_a_file_and_parquet(model_file: Path, tmp_path: Path) -> None:
    frame = _flowers().drop(columns=["species"])  # no target: fine
    frame.to_parquet(tmp_path / "in.parquet")
    out = tmp_path / "out" / "pred.csv"
    result = runner.invoke(
        app, ["predict", str(model_file), str(tmp_path / "in.parquet"), "-o", str(out), "--proba"]
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    assert "wrote 150 predictions" in result.stderr
    pred = pd.read_csv(out)
    classes = ["setosa", "versicolor", "virginica"]
    assert list(pred.columns) == ["prediction", *[f"proba_{c}" for c in classes]]
    probs = pred[[f"proba_{c}" for c in classes]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)  # rounded to 6 decimals
    assert (np.array(classes)[probs.argmax(axis=1)] == pred["prediction"]).all()


def test_predict_writes_parquet_and_never_over_its_inputs(model_file: Path, tmp_path: Path) -> None:
    data = tmp_path / "in.csv"
    _flowers().to_csv(data, index=False)
    before = data.read_bytes()
    out = tmp_path / "pred.parquet"
    result = runner.invoke(app, ["predict", str(model_file), str(data), "-o", str(out)])
    assert result.exit_code == 0, result.stderr
    assert len(pd.read_parquet(out)) == 150  # Parquet, as the name says
    for target, message in [
        (data, "is the input file"),  # would replace the user's data with predictions
        (model_file, "is the input file"),
        (tmp_path, "is a folder; name a file"),
        (tmp_path / "p.npz", "unknown file type '.npz'; use .csv (or .csv.gz) or .parquet"),
    ]:
        refused = runner.invoke(app, ["predict", str(model_file), str(data), "-o", str(target)])
        assert refused.exit_code == 2, (target, refused.stderr)
        assert message in refused.stderr
    assert data.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind


def test_predict_missing_column_is_bad_input(model_file: Path, tmp_path: Path) -> None:
    frame = _flowers().drop(columns=["petal width (cm)"])
    frame.to_csv(tmp_path / "in.csv", index=False)
    result = runner.invoke(app, ["predict", str(model_file), str(tmp_path / "in.csv")])
    assert result.exit_code == 2
    assert "lacks the feature column(s) petal width (cm)" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a model", "not an automl model file"),
        (b"a,b\n1,2\n", "not an automl model file"),
        (b"PK\x03\x04 not really a zip", "not an automl model file (it is not a file torch saved)"),
        (None, "no such model file"),
    ],
)
def test_predict_with_a_bad_model_file(content: bytes | None, message: str, tmp_path: Path) -> None:
    path = tmp_path / "m.pt"
    if content is not None:
        path.write_bytes(content)
    (tmp_path / "in.csv").write_text("a,b\n1,2\n")
    result = runner.invoke(app, ["predict", str(path), str(tmp_path / "in.csv")])
    assert result.exit_code == 2
    assert message in result.stderr
    assert "pop from" not in result.stderr and result.stderr.count("\n") == 1


def test_predict_refuses_a_pickle_that_would_run_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    torch.save({"format": "automl-model", "x": Evil()}, tmp_path / "evil.pt")
    (tmp_path / "in.csv").write_text("a\n1\n")
    result = runner.invoke(app, ["predict", str(tmp_path / "evil.pt"), str(tmp_path / "in.csv")])
    assert result.exit_code == 2
    assert not marker.exists()


def test_npz_model_predicts_integer_labels(tmp_path: Path) -> None:
    from sklearn.datasets import load_iris

    X, y = load_iris(return_X_y=True)
    np.savez(tmp_path / "iris.npz", X=X, y=y)
    space = SPACE.replace("../data/flowers.csv", "iris.npz").replace("  target: species\n", "")
    space = space.replace("  drop: [row_id]\n", "").replace("epochs: 6", "epochs: 2")
    (tmp_path / "npz.yaml").write_text(space)
    url = f"sqlite:///{tmp_path / 'npz.db'}"
    run = runner.invoke(
        app,
        [
            "run",
            "npz.yaml",
            "--storage",
            url,
            "--n-trials",
            "1",
            "--study",
            "npz",
            "--device",
            "cpu",
        ],
    )
    assert run.exit_code == 0, run.stderr
    model = tmp_path / "npz.pt"
    assert runner.invoke(app, ["retrain", "npz", "--storage", url, "-o", str(model)]).exit_code == 0
    np.savez(tmp_path / "new.npz", X=X[:7])
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "new.npz")])
    assert result.exit_code == 0, result.stderr
    out = pd.read_csv(io.StringIO(result.stdout))
    assert len(out) == 7
    assert out["prediction"].dtype == np.int64
    assert set(out["prediction"]) <= {0, 1, 2}


def _small_run(tmp_path: Path, name: str, data: str, model: str, objective: str) -> str:
    space = f"""\
name: {name}
data: {{dataset: {data}, validation: 0.2}}
model: {model}
train: {{epochs: 2, patience: 0}}
objective: {objective}
study: {{sampler: random, pruner: none, seed: 0}}
space:
  optimizer: {{adam: {{lr: 0.01}}}}
  loss: mse
  batch_size: 32
  hidden_units: 16
  n_layers: 1
"""
    (tmp_path / f"{name}.yaml").write_text(space)
    url = f"sqlite:///{tmp_path / 'small.db'}"
    result = runner.invoke(
        app, ["run", f"{name}.yaml", "--storage", url, "--n-trials", "1", "--device", "cpu"]
    )
    assert result.exit_code == 0, result.stderr
    out = runner.invoke(app, ["retrain", name, "--storage", url, "-o", f"{name}.pt"])
    assert out.exit_code == 0, out.stderr
    return f"{name}.pt"


def test_regression_predicts_in_the_targets_units(tmp_path: Path) -> None:
    from sklearn.datasets import load_diabetes

    model = _small_run(tmp_path, "diab", "diabetes", "mlp", "val_rmse")
    frame = load_diabetes(as_frame=True).frame
    frame.to_csv(tmp_path / "d.csv", index=False)
    result = runner.invoke(app, ["predict", model, str(tmp_path / "d.csv")])
    assert result.exit_code == 0, result.stderr
    pred = pd.read_csv(io.StringIO(result.stdout))["prediction"]
    assert len(pred) == len(frame) and pred.dtype == np.float64
    # decoded from the standardised output: in the target's range, not around 0
    assert 50 < pred.mean() < 300
    proba = runner.invoke(app, ["predict", model, str(tmp_path / "d.csv"), "--proba"])
    assert proba.exit_code == 2
    assert "--proba needs a classification model" in proba.stderr


def test_a_regression_csv_without_a_loss_trains_with_mse(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A data file's task is found when it is read (task: auto): a space that names no
    loss then takes the regression default, from the flags alone too, and retrain keeps it."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(80, 2))
    frame = pd.DataFrame({"a": x[:, 0], "b": x[:, 1], "price": 5000 + 300 * x[:, 0]})
    frame.to_csv(tmp_path / "prices.csv", index=False)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'p.db'}"
    args = ["run", "--data", "prices.csv", "--target", "price", "--epochs", "2"]
    result = runner.invoke(app, [*args, "--n-trials", "1", "--storage", url])
    assert result.exit_code == 0, result.stderr
    study = load_study("prices", url)
    assert "val_rmse" in study.trials[0].user_attrs  # a regression trial, trained
    out = runner.invoke(app, ["retrain", "prices", "--storage", url, "-o", "m.pt"])
    assert out.exit_code == 0, out.stderr
    assert torch.load("m.pt", weights_only=False)["config"]["loss"] == "mse"


def test_a_changed_data_file_is_noticed_on_resume_and_retrain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    frame = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60)})
    frame["y"] = (frame["a"] > 0).astype(int)
    frame.to_csv(tmp_path / "d.csv", index=False)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 'd.db'}"
    args = ["run", "--data", "d.csv", "--target", "y", "--epochs", "1", "--n-trials", "1"]
    first = runner.invoke(app, [*args, "--storage", url])
    assert first.exit_code == 0, first.stderr
    again = runner.invoke(app, [*args, "--storage", url])  # the same file: nothing said
    assert again.exit_code == 0 and "changed since" not in again.stderr
    frame.drop(columns=["b"]).to_csv(tmp_path / "d.csv", index=False)  # a column removed
    changed = runner.invoke(app, [*args, "--storage", url])
    assert changed.exit_code == 0
    assert "the data file d.csv changed since study 'd' was made" in " ".join(
        changed.stderr.split()
    )
    retrained = runner.invoke(app, ["retrain", "d", "--storage", url, "-o", "m.pt"])
    assert "changed since study 'd' was made" in " ".join(retrained.stderr.split())


def test_cnn_model_predicts_images(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    model = _small_run(tmp_path, "dcnn", "digits", "cnn", "val_accuracy")
    doc = torch.load(model, weights_only=True)
    assert doc["input_shape"] == [1, 8, 8]
    frame = load_digits(as_frame=True).frame.head(40)
    frame.to_csv(tmp_path / "digits.csv", index=False)
    result = runner.invoke(app, ["predict", model, str(tmp_path / "digits.csv"), "--proba"])
    assert result.exit_code == 0, result.stderr
    out = pd.read_csv(io.StringIO(result.stdout))
    assert len(out) == 40
    assert list(out.columns) == ["prediction", *[f"proba_{d}" for d in range(10)]]
    assert set(out["prediction"]) <= set(range(10))
    # The same images from an NPZ, whatever X's shape: its values in order.
    images = frame.drop(columns=["target"]).to_numpy(dtype=np.float32)
    for shape in [(40, 8, 8), (40, 1, 8, 8), (40, 64)]:
        np.savez(tmp_path / "d.npz", X=images.reshape(shape))
        npz = runner.invoke(app, ["predict", model, str(tmp_path / "d.npz"), "--proba"])
        assert npz.exit_code == 0, npz.stderr
        assert pd.read_csv(io.StringIO(npz.stdout)).equals(out)
    np.savez(tmp_path / "d.npz", X=images[:, :49].reshape(40, 7, 7))
    wrong = runner.invoke(app, ["predict", model, str(tmp_path / "d.npz")])
    assert wrong.exit_code == 2
    assert "each row of X holds 1 x 7 x 7 values (49); the model takes 1 x 8 x 8 (64)" in (
        " ".join(wrong.stderr.split())
    )


@pytest.mark.parametrize(("run_seed", "number"), [(7, 5), (None, 2), (3, 0), (123456, 41)])
def test_data_seed_is_found_from_the_trials_seed(
    run_seed: int | None, number: int, tmp_path: Path
) -> None:
    """`run --seed N` splits the data with N: retrain must find N again to split alike."""
    import optuna
    import yaml

    from automl.objective import trial_seed
    from automl.retrain import data_seed
    from automl.spaces import parse_space

    space = parse_space(yaml.safe_load(SPACE), source=SPACE)  # study.seed: 3
    study = optuna.create_study()
    trial = optuna.trial.create_trial(value=0.5, user_attrs={"seed": trial_seed(run_seed, number)})
    trial.number = number
    assert data_seed(study, trial, space) == (run_seed or 0)


def _search_once(folder: Path, space_text: str) -> str:
    """Run one trial of ``space_text`` (written to ``folder``) through the CLI; the storage."""
    space = folder / "space.yaml"
    space.write_text(space_text)
    url = f"sqlite:///{folder / 'study.db'}"
    result = runner.invoke(app, ["run", str(space), "--n-trials", "1", "--storage", url])
    assert result.exit_code == 0, result.output
    return url


def test_a_stored_space_with_a_bundled_dataset_and_a_target_still_retrains(
    tmp_path: Path,
) -> None:
    """Earlier versions accepted (and ignored) ``data.target`` beside a bundled dataset;
    a space file saying so is refused now, but a study that stored one still retrains."""
    url = _search_once(
        tmp_path,
        "name: old-iris\ndata:\n  dataset: iris\ntrain: {epochs: 1}\n"
        "space: {hidden_units: [8], batch_size: [32]}\n",
    )
    study = load_study("old-iris", url)
    old = study.user_attrs["space"].replace("dataset: iris", "dataset: iris\n  target: species")
    assert "target: species" in old
    study.set_user_attr("space", old)
    refused = tmp_path / "refused.yaml"
    refused.write_text(old)
    result = runner.invoke(app, ["space", "check", str(refused)])
    assert result.exit_code == 2 and "has its own target" in result.output
    out = tmp_path / "m.pt"
    result = runner.invoke(app, ["retrain", "old-iris", "--storage", url, "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert out.exists()


def test_a_model_trained_without_a_header_predicts_files_without_one(tmp_path: Path) -> None:
    rows = [f"{i % 7},{(i * 3) % 5},{'a' if i % 7 > 3 else 'b'}" for i in range(120)]
    (tmp_path / "plain.csv").write_text("\n".join(rows) + "\n")
    url = _search_once(
        tmp_path,
        "name: plain\ndata: {path: plain.csv, header: false, target: x2}\n"
        "train: {epochs: 2}\nspace: {hidden_units: [8], batch_size: [32]}\n",
    )
    model = tmp_path / "plain.pt"
    result = runner.invoke(app, ["retrain", "plain", "--storage", url, "-o", str(model)])
    assert result.exit_code == 0, result.output
    (tmp_path / "new.csv").write_text("6,1\n0,4\n5,2\n")  # no header, no target
    result = runner.invoke(app, ["predict", str(model), str(tmp_path / "new.csv")])
    assert result.exit_code == 0, result.output
    lines = result.output.split()
    assert lines[0] == "prediction" and len(lines) == 4  # all three rows, none taken as names
    assert set(lines[1:]) <= {"a", "b"}


def test_no_output_is_written_over_the_files_a_study_lives_on(
    searched: Searched, tmp_path: Path
) -> None:
    """retrain, report, export and predict -o never replace the storage, its SQLite
    sidecars, the data file or the space file, however the path is spelled."""
    db = searched.root / "studies.db"
    data = searched.root / "data" / "flowers.csv"
    space = searched.root / "spaces" / "flowers.yaml"
    before = {p: p.read_bytes() for p in (db, data, space)}
    storage = ["--storage", searched.url]
    detour = searched.root / "nosuch" / ".." / "data" / "flowers.csv"  # nosuch/ not there
    cases = [
        (["retrain", "flowers", *storage, "-o", str(db)], "is the study's SQLite storage"),
        (["report", "flowers", *storage, "-o", str(db)], "is the study's SQLite storage"),
        (["export", "flowers", *storage, "-o", f"{db}-wal"], "is a file of the SQLite storage"),
        (["retrain", "flowers", *storage, "-o", str(detour)], "is the study's data file"),
        (["export", "flowers", *storage, "-o", str(data)], "is the study's data file"),
        (["report", "flowers", *storage, "-o", str(space)], "is the study's space file"),
    ]
    for args, message in cases:
        refused = runner.invoke(app, args)
        assert refused.exit_code == 2, (args, refused.stderr)
        assert message in refused.stderr, refused.stderr
        assert refused.stderr.count("\n") == 1  # one line
    assert {p: p.read_bytes() for p in before} == before
    assert not (searched.root / "nosuch").exists()
    # The study still loads and a write elsewhere works.
    ok = runner.invoke(app, ["export", "flowers", *storage, "-o", str(tmp_path / "t.csv")])
    assert ok.exit_code == 0, ok.stderr
    assert len(pd.read_csv(tmp_path / "t.csv")) == 3


def test_predict_refuses_an_output_that_reaches_its_input_through_a_missing_folder(
    model_file: Path, tmp_path: Path
) -> None:
    data = tmp_path / "in.csv"
    _flowers().to_csv(data, index=False)
    before = data.read_bytes()
    detour = tmp_path / "nosuch" / ".." / "in.csv"
    refused = runner.invoke(app, ["predict", str(model_file), str(data), "-o", str(detour)])
    assert refused.exit_code == 2
    assert "is the input file" in refused.stderr
    assert data.read_bytes() == before
    assert not (tmp_path / "nosuch").exists()


def test_predict_reads_values_too_large_for_the_model_as_missing(
    model_file: Path, tmp_path: Path
) -> None:
    frame = _flowers().head(4).drop(columns=["species"])
    frame.loc[0, "sepal length (cm)"] = 1e300  # float32 overflows: the row's output was NaN
    frame.loc[1, "petal length (cm)"] = -1e308
    frame.to_csv(tmp_path / "in.csv", index=False)
    result = runner.invoke(app, ["predict", str(model_file), str(tmp_path / "in.csv"), "--proba"])
    assert result.exit_code == 0, result.stderr
    pred = pd.read_csv(io.StringIO(result.stdout))
    probs = pred.filter(like="proba_").to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert pred["prediction"].notna().all()
    assert "RuntimeWarning" not in result.stderr
    lines = [x for x in result.stderr.splitlines() if "too large for the model" in x]
    assert len(lines) == 2 and "'sepal length (cm)'" in lines[0]


def test_retrain_fits_the_preprocessing_on_train_and_validation(tmp_path: Path) -> None:
    """A category only validation rows hold is known to the final model (it learns
    from them), so predicting the study's own data warns of no unseen category."""
    rng = np.random.default_rng(0)
    n = 60
    frame = pd.DataFrame({"a": rng.normal(size=n), "color": ["red", "blue"] * (n // 2)})
    frame["label"] = np.where(frame["a"] > 0, "yes", "no")
    space_text = """\
name: colors
data: {path: colors.csv, target: label, validation: 0.25, test: 0}
train: {epochs: 2, patience: 0}
objective: val_accuracy
study: {sampler: random, pruner: none, seed: 0}
space:
  optimizer: {adam: {lr: 0.01}}
  batch_size: 16
  hidden_units: 8
  n_layers: 1
"""
    (tmp_path / "colors.yaml").write_text(space_text)
    frame.to_csv(tmp_path / "colors.csv", index=False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    old = Path.cwd()
    os.chdir(tmp_path)
    try:
        from automl.data import load_dataset

        space = load_space("colors.yaml")
        # Give the validation rows (as the search splits them) a colour of their own.
        from automl.data import _split

        _, val_idx, _ = _split("colors.csv", n, space.data, 0, frame["label"].to_numpy())
        assert len(val_idx) == 15
        frame.loc[val_idx, "color"] = "green"
        frame.to_csv("colors.csv", index=False)
        space = load_space("colors.yaml")
        run_study(space, RunOptions(study_name="colors", storage_url=url, n_trials=1, device="cpu"))
        searched_pre = load_dataset(space.data, seed=0).preprocessor
        assert searched_pre.categories == [["blue", "red"]]  # the search: train rows only
        result = runner.invoke(app, ["retrain", "colors", "--storage", url, "-o", "m.pt"])
        assert result.exit_code == 0, result.stderr
        kept = load_model_file(Path("m.pt"))
        assert kept.preprocessor.categories == [["blue", "green", "red"]]
        pred = runner.invoke(app, ["predict", "m.pt", "colors.csv"])
        assert pred.exit_code == 0, pred.stderr
        assert "not seen in training" not in pred.stderr
        reused = runner.invoke(
            app, ["retrain", "colors", "--storage", url, "-o", "r.pt", "--reuse"]
        )
        assert reused.exit_code == 0, reused.stderr
        assert load_model_file(Path("r.pt")).preprocessor.categories == [["blue", "red"]]
    finally:
        os.chdir(old)


def test_no_output_is_written_over_another_studys_data_file(tmp_path: Path) -> None:
    from automl.outputs import refuse_overwrite, study_files

    storage = optuna.storages.InMemoryStorage()
    mine = optuna.create_study(storage=storage, study_name="mine")
    other = optuna.create_study(storage=storage, study_name="other")
    other.set_user_attr("data_path", str(tmp_path / "theirs.csv"))
    files = study_files(mine, f"sqlite:///{tmp_path / 's.db'}")
    with pytest.raises(UsageError, match="is the data file of study 'other'"):
        refuse_overwrite(tmp_path / "theirs.csv", files)
    refuse_overwrite(tmp_path / "new.csv", files)  # anything else is fine
