"""Datasets, data files, the task auto rule, preprocessing and splits."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from automl.data import Preprocessor, infer_task, load_dataset, read_table
from automl.errors import DataError, SpaceError
from automl.spaces import DataSpec, load_space, parse_space

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    ("name", "task", "n_classes", "n_features"),
    [
        ("iris", "classification", 3, 4),
        ("wine", "classification", 3, 13),
        ("breast_cancer", "classification", 2, 30),
        ("digits", "classification", 10, 64),
        ("diabetes", "regression", 0, 10),
    ],
)
def test_bundled_datasets(name: str, task: str, n_classes: int, n_features: int) -> None:
    ds = load_dataset(DataSpec(dataset=name, validation=0.2, test=0.1))
    assert ds.task == task and ds.n_classes == n_classes and ds.n_features == n_features
    n = len(ds.X_train) + len(ds.X_val) + len(ds.X_test)
    assert len(ds.X_val) == int(n * 0.2) and len(ds.X_test) == int(n * 0.1)
    assert ds.input_shape == ((1, 8, 8) if name == "digits" else (n_features,))
    # Standardized with the training split's statistics.
    assert np.allclose(ds.X_train.mean(axis=0), 0, atol=1e-5)


def _frame(n: int = 90, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    frame = pd.DataFrame(
        {
            "id": np.arange(n),
            "size": rng.normal(10, 3, n),
            "count": rng.integers(0, 5, n).astype(float),
            "colour": rng.choice(["red", "green", "blue"], n),
            "label": rng.choice(["cat", "dog", "eel"], n),
        }
    )
    frame.loc[[1, 5, 9], "size"] = np.nan
    frame.loc[[2, 7], "colour"] = np.nan
    return frame


def _csv(tmp_path: Path, frame: pd.DataFrame, name: str = "d.csv") -> str:
    path = tmp_path / name
    frame.to_csv(path, index=False)
    return str(path)


def test_csv_with_target_drop_missing_values_and_string_labels(tmp_path: Path) -> None:
    path = _csv(tmp_path, _frame())
    ds = load_dataset(DataSpec(path=path, target="label", drop=("id",), validation=0.3))
    pre = ds.preprocessor
    assert ds.task == "classification"
    assert pre.classes == ["cat", "dog", "eel"]
    assert pre.numeric == ["size", "count"] and pre.categorical == ["colour"]
    assert pre.categories == [["blue", "green", "red"]]
    assert ds.n_features == 2 + 3 and "id" not in pre.feature_columns
    assert not np.isnan(ds.X_train).any() and not np.isnan(ds.X_val).any()
    labels = pre.decode_target(ds.y_val)
    assert set(labels) <= {"cat", "dog", "eel"} and isinstance(labels[0], str)
    assert list(pre.encode_target(labels)) == list(ds.y_val)


def test_preprocessing_matches_scikit_learn_fitted_on_the_training_split(tmp_path: Path) -> None:
    from sklearn.compose import ColumnTransformer
    from sklearn.impute import SimpleImputer
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import OneHotEncoder, StandardScaler

    frame = _frame(120)
    train, new = frame.iloc[:80].drop(columns=["label", "id"]), frame.iloc[80:].copy()
    new = new.drop(columns=["label", "id"])
    new.loc[new.index[0], "colour"] = "purple"  # a category never seen in training
    new.loc[new.index[1], "size"] = np.nan
    reference = ColumnTransformer(
        [
            (
                "num",
                make_pipeline(SimpleImputer(strategy="median"), StandardScaler()),
                ["size", "count"],
            ),
            (
                "cat",
                make_pipeline(
                    SimpleImputer(strategy="most_frequent"),
                    OneHotEncoder(handle_unknown="ignore", sparse_output=False),
                ),
                ["colour"],
            ),
        ]
    ).fit(train)
    pre = Preprocessor().fit(train)
    assert np.allclose(pre.transform(train), reference.transform(train), atol=1e-6)
    got = pre.transform(new)
    assert np.allclose(got, reference.transform(new), atol=1e-6)
    assert got[0, 2:].tolist() == [0.0, 0.0, 0.0]  # unknown category: all zeros
    # The state is plain: it survives a round trip through plain data.
    again = Preprocessor.from_state(pre.to_state())
    assert np.array_equal(again.transform(new), got)
    assert all(isinstance(v, float) for v in pre.to_state()["medians"])


def test_the_split_is_used_for_fitting_not_the_whole_file(tmp_path: Path) -> None:
    frame = _frame(100)
    frame["size"] = np.arange(100, dtype=float)  # no missing values, a distinct mean
    path = _csv(tmp_path, frame)
    ds = load_dataset(DataSpec(path=path, target="label", drop=("id",), validation=0.5))
    pre = ds.preprocessor
    # Recover which sizes (0..99, one per row) went to validation; training got the rest.
    raw_val = np.rint(ds.X_val[:, 0] * pre.scales[0] + pre.means[0]).astype(int)
    train_sizes = np.setdiff1d(np.arange(100), raw_val)
    assert len(train_sizes) == 50
    assert pre.means[0] == pytest.approx(train_sizes.mean())
    assert pre.scales[0] == pytest.approx(train_sizes.std())
    assert pre.medians[0] == pytest.approx(np.median(train_sizes))
    assert pre.means[0] != pytest.approx(49.5)  # not the whole file's mean


def test_rows_with_a_missing_target_are_dropped_with_a_count(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    frame = _frame(60)
    frame.loc[[3, 4, 10, 20], "label"] = np.nan
    path = _csv(tmp_path, frame)
    with caplog.at_level(logging.WARNING, logger="automl.data"):
        ds = load_dataset(DataSpec(path=path, target="label", drop=("id",)))
    assert "dropped 4 row(s)" in caplog.text
    assert len(ds.X_train) + len(ds.X_val) == 56


def test_parquet_and_csv_give_the_same_data(tmp_path: Path) -> None:
    frame = _frame()
    csv = _csv(tmp_path, frame)
    parquet = tmp_path / "d.parquet"
    frame.to_parquet(parquet)
    a = load_dataset(DataSpec(path=csv, target="label", drop=("id",)))
    b = load_dataset(DataSpec(path=str(parquet), target="label", drop=("id",)))
    assert np.allclose(a.X_train, b.X_train) and np.array_equal(a.y_val, b.y_val)


@pytest.mark.parametrize(
    ("text", "columns", "first_row"),
    [
        # a spreadsheet's export in many locales: semicolons, decimal commas, a BOM
        ("\ufeffa;b;label\n1,5;-2,25;x\n3;4,0;y\n", ["a", "b", "label"], [1.5, -2.25, "x"]),
        ("a\tb\tlabel\n1.5\t2\tx\n3\t4\ty\n", ["a", "b", "label"], [1.5, 2, "x"]),
        ("a|b|label\n1.5|2|x\n3|4|y\n", ["a", "b", "label"], [1.5, 2, "x"]),
        # semicolons with decimal points stay points
        ("a;b;label\n1.5;2;x\n3;4;y\n", ["a", "b", "label"], [1.5, 2, "x"]),
        # commas first: a comma file whose text holds semicolons
        ('a,b,label\n1.5,2,"x;y"\n3,4,y\n', ["a", "b", "label"], [1.5, 2, "x;y"]),
        # rows of another width than the header: read with commas, as before
        ("a,b,label\n1,2\n3,4,y\n", ["a", "b", "label"], [1, 2, None]),
    ],
)
def test_csv_delimiters_and_decimal_commas_are_detected(
    tmp_path: Path, text: str, columns: list[str], first_row: list[Any]
) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text, encoding="utf-8")
    frame, _ = read_table(path)
    assert list(frame.columns) == columns
    row = [None if isinstance(v, float) and v != v else v for v in frame.iloc[0].tolist()]
    assert row == first_row


@pytest.mark.parametrize("compression", ["gz", "bz2", "xz"])
def test_compressed_csv_files_are_read(tmp_path: Path, compression: str) -> None:
    import bz2
    import gzip
    import lzma

    opener = {"gz": gzip.open, "bz2": bz2.open, "xz": lzma.open}[compression]
    path = tmp_path / f"t.csv.{compression}"
    with opener(path, "wt", encoding="utf-8") as fh:
        fh.write("a;b;label\n1,5;2;x\n3;4;y\n")
    frame, _ = read_table(path)
    assert list(frame.columns) == ["a", "b", "label"]
    assert frame["a"].tolist() == [1.5, 3.0]
    fake = tmp_path / f"fake.csv.{compression}"
    fake.write_text("a,b\n1,2\n")  # not compressed at all
    with pytest.raises(DataError, match="cannot read the data file"):
        read_table(fake)
    with pytest.raises(DataError, match=r"unsupported file type '\.json\.gz'"):
        (tmp_path / "t.json.gz").write_bytes(b"")
        read_table(tmp_path / "t.json.gz")


def _uci_iris(path: Path) -> None:
    """iris as the UCI repository ships it: no header row, the label last."""
    from sklearn.datasets import load_iris

    bunch = load_iris()
    names = ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]
    rows = [
        ",".join(f"{v:.1f}" for v in x) + f",{names[y]}"
        for x, y in zip(bunch.data, bunch.target, strict=True)
    ]
    path.write_text("\n".join(rows) + "\n")


def test_a_csv_without_a_header_row(tmp_path: Path) -> None:
    path = tmp_path / "iris.data"  # UCI's suffix, read as CSV
    _uci_iris(path)
    with pytest.raises(DataError, match=r"looks like data, not column names: add 'header: false'"):
        load_dataset(DataSpec(path=str(path), target="species"))
    with pytest.raises(DataError, match=r"'header: false'.*x0 \.\. x4"):
        load_dataset(DataSpec(path=str(path)))  # no target named
    data = load_dataset(DataSpec(path=str(path), header=False, target="x4"))
    assert data.preprocessor.numeric == ["x0", "x1", "x2", "x3"]
    assert data.preprocessor.classes == ["Iris-setosa", "Iris-versicolor", "Iris-virginica"]
    assert len(data.X_train) + len(data.X_val) == 150  # the first row is data, not names
    assert data.preprocessor.header is False
    with pytest.raises(DataError, match="target column 'x4' is not in the file"):
        load_dataset(DataSpec(path=str(path), target="x4"))  # header: true, the default
    frame = pd.read_csv(path, header=None)
    frame.columns = [f"c{i}" for i in range(5)]
    frame.to_parquet(tmp_path / "iris.parquet")
    with pytest.raises(DataError, match=r"data\.header applies to CSV files"):
        load_dataset(DataSpec(path=str(tmp_path / "iris.parquet"), header=False, target="c4"))


def test_a_text_column_unique_in_every_row_gets_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rows = ["name,colour,x,y"] + [
        f"person{i},{'red' if i % 2 else 'blue'},{i % 5},{'a' if i % 3 else 'b'}" for i in range(60)
    ]
    (tmp_path / "people.csv").write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(tmp_path / "people.csv"), target="y"))
    assert "column 'name' has a different text value in every training row" in caplog.text
    assert "colour" not in caplog.text  # two values: a real category
    assert data.preprocessor.categorical == ["name", "colour"]  # a warning, not a change


def test_codes_read_as_floats_where_a_value_is_missing_keep_their_categories(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Training read a column of codes as text ('1', '2', 'x'); a new file whose column
    has an empty cell is read by pandas as floats (1.0, 2.0, NaN): the same categories.
    What cannot be used as trained is said, with the file's name."""
    train = pd.DataFrame({"a": [0.5, 1.5, 2.5, 3.5], "grade": ["1", "2", "x", "2"]})
    pre = Preprocessor().fit(train)
    assert pre.categorical == ["grade"] and pre.categories == [["1", "2", "x"]]
    as_text = pre.transform(pd.DataFrame({"a": [1.0, 2.0, 3.0], "grade": ["2", "1", "2"]}))
    new = pd.DataFrame({"a": ["1", "2", "oops"], "grade": [2.0, 1.0, np.nan]})
    with caplog.at_level("WARNING"):
        as_floats = pre.transform(new, warn="new.csv")
    assert np.array_equal(as_floats[:2, 1:], as_text[:2, 1:])  # 2.0 -> '2', 1.0 -> '1'
    assert as_floats[2, 1:].tolist() == [0.0, 1.0, 0.0]  # missing: the mode, '2'
    assert "new.csv: 1 value(s) of numeric column 'a' are not numbers" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        unseen = pre.transform(pd.DataFrame({"a": [1.0], "grade": ["zz"]}), warn="f.csv")
    assert unseen[0, 1:].tolist() == [0.0, 0.0, 0.0]
    assert "f.csv: 1 value(s) of column 'grade' are categories not seen in training ('zz')" in (
        caplog.text
    )
    # Codes that two categories write alike ('01' and '1') are matched by text only.
    twins = Preprocessor().fit(pd.DataFrame({"a": [1.0, 2.0], "c": ["01", "1"]}))
    assert twins.transform(pd.DataFrame({"a": [1.0], "c": [1.0]}))[0, 1:].tolist() == [0, 0]


def test_values_too_large_infinite_targets_and_friendly_settings(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({"a": rng.normal(size=60), "b": rng.normal(size=60) * 1e200})
    frame["y"] = rng.normal(size=60)
    frame.loc[[3, 7], "y"] = [np.inf, -np.inf]
    frame.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(DataError, match=r"column 'b' holds values up to .*e\+200, too large"):
        load_dataset(DataSpec(path=str(tmp_path / "t.csv"), target="y"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with caplog.at_level("WARNING"):  # drop: b is one column; ~ is the home folder
        data = load_dataset(DataSpec(path="~/t.csv", target="y", drop="b"))  # type: ignore[arg-type]
    assert data.task == "regression" and data.preprocessor.numeric == ["a"]
    assert len(data.X_train) + len(data.X_val) == 58  # the infinite targets are missing
    assert "dropped 2 row(s)" in caplog.text and "missing (or infinite)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_dataset(DataSpec(path=str(tmp_path / "t.csv"), target="y", drop=("b", "y")))
    assert "data.drop names the target 'y'" in caplog.text


def test_a_numeric_column_with_a_few_stray_tokens_stays_numeric(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One '-' in a column of measurements made it text: a one-hot 'category' per number,
    with advice to drop it as an id. Codes with a text value (1, 2, 3, x) stay categories."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=300).round(3).astype(object)
    a[9], a[20] = "n/a?", "-"
    price = (rng.normal(size=300) * 100 + 1000).round(2).astype(object)
    price[5] = "unknown"
    frame = pd.DataFrame({"a": a, "code": rng.choice(["1", "2", "3", "x"], 300), "price": price})
    frame.to_csv(tmp_path / "s.csv", index=False)
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(tmp_path / "s.csv"), target="price"))
    assert data.task == "regression"  # the target too: numbers, one row without a value
    assert len(data.X_train) + len(data.X_val) == 299
    assert data.preprocessor.numeric == ["a"] and data.preprocessor.categorical == ["code"]
    assert "column 'a' of" in caplog.text and "2 value(s) ('n/a?', '-'), read as missing" in (
        caplog.text
    )
    assert "different text value in every training row" not in caplog.text


def test_class_labels_that_read_as_one_number_keep_their_own_values(tmp_path: Path) -> None:
    """'01' and '1' are two labels in the file; read as numbers they were one class."""
    rows = ["x,y"] + [f"{i},{['01', '1', '2'][i % 3]}" for i in range(60)]
    (tmp_path / "l.csv").write_text("\n".join(rows) + "\n")
    data = load_dataset(DataSpec(path=str(tmp_path / "l.csv"), target="y"))
    assert data.preprocessor.classes == ["01", "1", "2"]
    # Labels that read as distinct numbers stay numbers (ints, as before).
    plain = ["x,y"] + [f"{i},{i % 3}" for i in range(60)]
    (tmp_path / "p.csv").write_text("\n".join(plain) + "\n")
    assert load_dataset(
        DataSpec(path=str(tmp_path / "p.csv"), target="y")
    ).preprocessor.classes == [
        0,
        1,
        2,
    ]


def test_question_marks_in_a_csv_are_missing_values(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """UCI's files write '?' for a missing value: a numeric column with some stays numeric
    (imputed), and rows whose target is '?' are dropped like empty ones."""
    rows = ["horsepower,weight,mpg"]
    rows += [f"{100 + i},{2000 + 10 * i},{20 + i % 7}" for i in range(40)]
    rows += ["?,2500,21", "95,2400,?"]
    path = tmp_path / "auto.csv"
    path.write_text("\n".join(rows) + "\n")
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(path), target="mpg", task="regression"))
    assert data.preprocessor.numeric == ["horsepower", "weight"]
    assert data.preprocessor.categorical == []
    assert len(data.X_train) + len(data.X_val) == 41  # the '?' target's row dropped
    assert "dropped 1 row(s)" in caplog.text


def test_a_saved_row_index_without_a_header_is_not_a_feature(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``DataFrame.to_csv`` writes the index as a first column without a header; as a
    feature it would only tell the rows' order. Other unnamed columns stay features."""
    frame = pd.DataFrame(
        {
            "a": np.linspace(0, 1, 30),
            "": [3, 1, 2] * 10,  # unnamed, but not an index
            "y": ["p", "q"] * 15,
        }
    )
    path = tmp_path / "saved.csv"
    frame.to_csv(path)  # with the index
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(path), target="y"))
    assert data.preprocessor.numeric == ["a", "Unnamed: 2"]
    assert "ignored column 'Unnamed: 0'" in caplog.text and "saved row index" in caplog.text
    frame.to_csv(path, index=False)
    assert load_dataset(DataSpec(path=str(path), target="y")).preprocessor.numeric == [
        "a",
        "Unnamed: 1",
    ]


def test_the_empty_column_of_a_trailing_delimiter_is_ignored(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "trailing.csv"
    path.write_text("a,b,y,\n" + "1,2,x,\n3,4,z,\n" * 10)
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(path), target="y"))
    assert data.preprocessor.feature_columns == ["a", "b"]
    assert "ignored column 'Unnamed: 3'" in caplog.text and "entirely empty" in caplog.text
    named = tmp_path / "named.csv"  # an empty column the file names is still an error
    named.write_text("a,b,y,c\n" + "1,2,x,\n3,4,z,\n" * 10)
    with pytest.raises(DataError, match=r"column\(s\) c are entirely empty"):
        load_dataset(DataSpec(path=str(named), target="y"))


def test_npz_flat_and_images(tmp_path: Path) -> None:
    np.savez(tmp_path / "flat.npz", X=np.arange(40.0).reshape(20, 2), y=np.arange(20) * 1.5)
    ds = load_dataset(DataSpec(path=str(tmp_path / "flat.npz")))
    assert ds.task == "regression" and ds.input_shape == (2,)
    frame, shape = read_table(tmp_path / "flat.npz")
    assert shape is None and list(frame.columns) == ["x0", "x1", "y"]
    np.savez(tmp_path / "img.npz", X=np.zeros((10, 2, 3, 3)), y=np.arange(10) % 2)
    frame, shape = read_table(tmp_path / "img.npz")
    assert shape == [2, 3, 3] and frame.shape == (10, 19)


@pytest.mark.parametrize(
    ("values", "task"),
    [
        (["a", "b", "a", "c"], "classification"),
        ([True, False, True, True], "classification"),
        ([0, 1, 2, 1, 0], "classification"),
        ([1.0, 2.0, 2.0, np.nan], "classification"),  # whole numbers, few values
        (list(range(21)), "regression"),  # whole numbers, more than 20 values
        ([0.5, 1.25, 2.0, 3.0], "regression"),
    ],
)
def test_task_auto_rule(values: list[Any], task: str) -> None:
    assert infer_task(pd.Series(values)) == task


def test_explicit_task_overrides_the_rule(tmp_path: Path) -> None:
    frame = _frame(60)
    frame["score"] = np.arange(60) % 4  # would be classes under auto
    path = _csv(tmp_path, frame)
    auto = load_dataset(DataSpec(path=path, target="score", drop=("id", "label")))
    reg = load_dataset(DataSpec(path=path, target="score", drop=("id", "label"), task="regression"))
    assert auto.task == "classification" and reg.task == "regression"


def test_splits_are_stratified_and_seeded() -> None:
    spec = DataSpec(dataset="breast_cancer", validation=0.3)
    a, b, c = load_dataset(spec, seed=0), load_dataset(spec, seed=0), load_dataset(spec, seed=1)
    assert np.array_equal(a.X_val, b.X_val)
    assert not np.array_equal(a.X_val, c.X_val)
    share = np.concatenate([a.y_train, a.y_val]).mean()
    assert a.y_val.mean() == pytest.approx(share, abs=0.01)  # stratified: same class mix
    assert a.y_train.mean() == pytest.approx(share, abs=0.01)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"target": "lable"}, "did you mean 'label'"),
        ({"target": "label", "drop": ("nope",)}, "unknown column"),
        ({"target": "colour", "task": "regression"}, "non-numeric"),
        ({}, "say which column to predict"),
    ],
)
def test_bad_data_settings(tmp_path: Path, spec: dict[str, Any], message: str) -> None:
    path = _csv(tmp_path, _frame())
    with pytest.raises(DataError, match=message):
        load_dataset(DataSpec(path=path, **spec))


def test_unsupported_or_missing_files(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataError, match="unsupported file type"):
        read_table(tmp_path / "x.json")
    with pytest.raises(DataError, match="no such data file"):
        read_table(tmp_path / "missing.csv")


def _csv_space(path: str, target: str, loss: str, objective: str = "val_loss") -> Any:
    return parse_space(
        {
            "data": {"path": path, "target": target, "drop": ["id"]},
            "train": {"epochs": 1},
            "objective": objective,
            "space": {"loss": loss},
        }
    )


@pytest.mark.parametrize(
    ("target", "loss", "objective", "message"),
    [
        ("size", "cross_entropy", "val_loss", "'cross_entropy' does not fit a regression"),
        ("label", "bce", "val_loss", "'bce' needs exactly 2 classes"),
        ("label", "mse", "val_r2", "'val_r2' is a regression metric"),
    ],
)
def test_task_auto_mismatch_is_found_after_load_before_the_study(
    tmp_path: Path, target: str, loss: str, objective: str, message: str
) -> None:
    from automl.studies import RunOptions, run_study

    path = _csv(tmp_path, _frame())
    space = _csv_space(path, target, loss, objective)  # loads: the task is not known yet
    url = f"sqlite:///{tmp_path / 's.db'}"
    with pytest.raises(SpaceError, match=message):
        run_study(space, RunOptions(study_name="m", storage_url=url, n_trials=1, device="cpu"))
    assert not (tmp_path / "s.db").exists()  # nothing was written


def test_a_csv_study_through_the_cli_keeps_string_labels(tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from automl.cli import app

    frame = _frame(90)
    frame.to_csv(tmp_path / "pets.csv", index=False)
    (tmp_path / "pets.yaml").write_text(
        "data: {path: pets.csv, target: label, drop: [id]}\n"
        "train: {epochs: 2, patience: 0}\n"
        "objective: val_accuracy\n"
        "study: {pruner: none, seed: 0}\n"
        "space: {hidden_units: 8, loss: [cross_entropy, huber]}\n"
    )
    url = f"sqlite:///{tmp_path / 's.db'}"
    runner = CliRunner()
    res = runner.invoke(app, ["run", "pets.yaml", "--n-trials", "2", "--storage", url, "--json"])
    assert res.exit_code == 0, res.output
    best = json.loads(runner.invoke(app, ["best", "pets", "--storage", url, "--json"]).stdout)
    assert 0.0 <= best["value"] <= 1.0 and best["user_attrs"]["val_accuracy"] == pytest.approx(
        best["value"], abs=1e-6
    )
    # String labels end to end: retrain, then predict writes the original labels.
    res = runner.invoke(app, ["retrain", "pets", "-o", "pets.pt", "--storage", url])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["predict", "pets.pt", "pets.csv", "-o", "pred.csv"])
    assert res.exit_code == 0, res.output
    predicted = pd.read_csv(tmp_path / "pred.csv")["prediction"]
    assert len(predicted) == 90 and set(predicted) <= {"cat", "dog", "eel"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: {path: pets.csv, target: size, drop: [id]}\nspace: {loss: nll}\n")
    res = runner.invoke(app, ["run", str(bad), "--n-trials", "1", "--storage", url])
    assert res.exit_code == 2 and "'nll' does not fit a regression task" in res.output


def test_the_example_csv(caplog: pytest.LogCaptureFixture) -> None:
    space = load_space(ROOT / "search_spaces" / "tumors_csv.yaml")
    assert Path(space.data.path or "").resolve() == ROOT / "data" / "tumors.csv"
    with caplog.at_level(logging.WARNING, logger="automl.data"):
        ds = load_dataset(space.data, seed=space.study.seed or 0)
    assert "dropped 6 row(s)" in caplog.text
    assert ds.preprocessor.classes == ["benign", "malignant"]
    assert "patient_id" not in ds.preprocessor.feature_columns
    assert ds.preprocessor.categorical == ["size_group"]
    assert len(ds.X_train) + len(ds.X_val) + len(ds.X_test) == 563
    raw = pd.read_csv(ROOT / "data" / "tumors.csv")
    assert raw.drop(columns=["diagnosis"]).isna().sum().sum() > 50  # it does have holes


@pytest.mark.parametrize("path", sorted((ROOT / "search_spaces").glob("*.yaml")), ids=str)
def test_every_example_space_loads(path: Path) -> None:
    space = load_space(path)
    assert space.study.seed is not None


def test_the_csv_example_runs_from_another_folder_with_flags_over_it() -> None:
    from typer.testing import CliRunner

    from automl.cli import app

    example = ROOT / "search_spaces" / "tumors_csv.yaml"
    args = ["run", str(example), "--n-trials", "1", "--epochs", "1", "--storage", "sqlite:///s.db"]
    res = CliRunner().invoke(app, args)  # the working directory is a tmp folder
    assert res.exit_code == 0, res.output


def test_a_first_row_longer_than_the_header_is_refused_not_shifted(tmp_path: Path) -> None:
    """pandas reads such a row's first field as an index and shifts every column
    against its name (the label became a feature): refused like any ragged row."""
    rows = "".join(f"{i},{i % 3},{'xy'[i % 2]}\n" for i in range(20))
    (tmp_path / "r.csv").write_text("a,b,label\n1,2,x,9\n" + rows)
    with pytest.raises(DataError, match=r"r.csv: cannot read .*line 2 has more fields than the 3"):
        load_dataset(DataSpec(path=str(tmp_path / "r.csv"), target="label"))
    with pytest.raises(DataError, match=r"line 2 has more fields"):
        read_table(tmp_path / "r.csv")


def test_regression_targets_too_large_or_on_a_tiny_scale(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    a = rng.normal(size=40)
    frame = pd.DataFrame({"a": a, "y": a * 1e200})
    frame.to_csv(tmp_path / "big.csv", index=False)
    with pytest.raises(DataError, match=r"big.csv: the target 'y' holds values up to .*too large"):
        load_dataset(DataSpec(path=str(tmp_path / "big.csv"), target="y"))
    # A column's error names the file too.
    frame.rename(columns={"y": "z"}).assign(y=a).to_csv(tmp_path / "col.csv", index=False)
    with pytest.raises(DataError, match=r"col.csv: column 'z' holds values up to"):
        load_dataset(DataSpec(path=str(tmp_path / "col.csv"), target="y"))
    # A target in units of 1e-12 is standardised like any other (it was left unscaled).
    frame.assign(y=a * 1e-12).to_csv(tmp_path / "tiny.csv", index=False)
    data = load_dataset(DataSpec(path=str(tmp_path / "tiny.csv"), target="y"))
    assert 1e-13 < data.preprocessor.y_std < 1e-11
    assert 0.5 < float(np.std(data.y_train)) < 2.0


def test_target_and_drop_names_match_a_csv_header_written_with_spaces(tmp_path: Path) -> None:
    frame = _frame()
    frame.columns = [" id ", "size", "count", "colour", " label "]
    path = _csv(tmp_path, frame)
    data = load_dataset(DataSpec(path=path, target=" label ", drop=(" id ",)))
    assert data.preprocessor.target == "label" and "id" not in data.preprocessor.numeric


def test_text_columns_that_look_numeric_get_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rng = np.random.default_rng(0)
    rows = [
        (
            f'"{rng.integers(1000, 99999):,}.5"',
            "-" if i % 6 == 0 else f"{rng.random():.3f}",
            "ab"[i % 2],
        )
        for i in range(40)
    ]
    (tmp_path / "t.csv").write_text(
        "amount,dash,label\n" + "".join(f"{a},{d},{y}\n" for a, d, y in rows)
    )
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(tmp_path / "t.csv"), target="label"))
    assert data.preprocessor.categorical == ["amount", "dash"]  # as before: categories
    assert "column 'amount' of" in caplog.text and "thousands separators" in caplog.text
    assert (
        "column 'dash' of" in caplog.text and "mostly numbers, but 7 value(s) ('-')" in caplog.text
    )


def test_a_parquet_file_naming_a_column_twice_is_refused_in_plain_words(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table([pa.array([1.0, 2.0]), pa.array([3.0, 4.0])], names=["a", "a"])
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d.parquet: the file names column 'a' more than once"):
        read_table(tmp_path / "d.parquet")


def test_dates_are_days_not_categories(tmp_path: Path) -> None:
    """A date column was one-hot text: no use on later dates, refused past 1000 days."""
    rng = np.random.default_rng(0)
    n = 1500
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.permutation(n), unit="D")
    frame = pd.DataFrame({"when": days.strftime("%Y-%m-%d"), "x": rng.normal(size=n)})
    frame["y"] = (days.year > 2025).astype(int)
    frame.loc[3, "when"] = None
    frame.to_csv(tmp_path / "d.csv", index=False)
    parquet = frame.assign(when=pd.to_datetime(frame["when"]))
    parquet.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.parquet"):
        data = load_dataset(DataSpec(path=str(tmp_path / name), target="y"))
        pre = data.preprocessor
        assert pre.dates == ["when"] and pre.numeric == ["when", "x"] and not pre.categorical
        assert not np.isnan(data.X_train).any()  # the missing date took the median
    # Later dates are numbers beyond the training range, not unknown categories.
    restored = Preprocessor.from_state(pre.to_state())
    later = pd.DataFrame({"when": ["2031-06-01", "2024-01-01"], "x": [0.0, 0.0]})
    out = restored.transform(later)
    assert out[0, 0] > out[1, 0] and out[0, 0] > data.X_train[:, 0].max()
    # Text that is not ISO dates stays text.
    assert not Preprocessor().fit(pd.DataFrame({"d": ["03/04/2024"] * 10})).dates


def test_dates_outside_pandas_nanoseconds_and_non_dates_in_a_date_column(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """9999-12-31 ("no end date") crashed the run: pandas' nanosecond timestamps end in
    2262. Text that is not a date in a date column is missing, with a warning."""
    rng = np.random.default_rng(1)
    days = pd.Timestamp("2024-01-01") + pd.to_timedelta(rng.integers(0, 900, 200), unit="D")
    frame = pd.DataFrame({"end": days.strftime("%Y-%m-%d"), "y": rng.integers(0, 2, 200)})
    frame.loc[5, "end"] = "9999-12-31"
    frame.loc[6, "end"] = "0001-01-01"
    frame.loc[7, "end"] = "unknown"
    frame.to_csv(tmp_path / "d.csv", index=False)
    with caplog.at_level("WARNING"):
        data = load_dataset(DataSpec(path=str(tmp_path / "d.csv"), target="y"))
    assert data.preprocessor.dates == ["end"] and np.isfinite(data.X_train).all()
    assert "column 'end' holds dates, but 1 value(s) are not dates" in caplog.text
