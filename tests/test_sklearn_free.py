"""The data path's own versions of scikit-learn's loaders, splits and preprocessing
statistics (automl.bundled, automl.data) give exactly what scikit-learn gives, so that
studies keep their splits and preprocessing; and a run no longer imports scikit-learn."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from conftest import imported_by
from sklearn import datasets
from sklearn.impute import SimpleImputer
from sklearn.model_selection import train_test_split as sk_split
from sklearn.preprocessing import OneHotEncoder, StandardScaler

from automl.bundled import FEATURES, load_bundled
from automl.data import fit_numeric, fit_text, train_test_split
from automl.errors import DataError
from automl.spaces import BUNDLED_DATASETS


@pytest.mark.parametrize("name", sorted(BUNDLED_DATASETS))
def test_bundled_frames_equal_sklearns(name: str) -> None:
    frame, target = load_bundled(name)
    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    pd.testing.assert_frame_equal(frame, bunch.frame.drop(columns=["target"]), check_exact=True)
    pd.testing.assert_series_equal(target, bunch.target, check_exact=True)


def _cases() -> list[tuple[int, int, int, int]]:
    """(n rows, n classes or 0 for no stratification, n_test, seed)."""
    rng = np.random.default_rng(0)
    cases = [(1797, 10, 359, 0), (150, 3, 45, 0), (150, 3, 30, 7), (40, 0, 9, 3), (33, 4, 8, 11)]
    for _ in range(60):
        classes = int(rng.integers(0, 7))
        n = int(rng.integers(max(4, 3 * classes), 400))
        low = max(1, classes)
        high = n - max(1, classes)
        if low >= high:
            continue
        cases.append((n, classes, int(rng.integers(low, high)), int(rng.integers(0, 2**31))))
    return cases


@pytest.mark.parametrize(("n", "classes", "n_test", "seed"), _cases())
def test_split_equals_sklearns(n: int, classes: int, n_test: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    indices = np.arange(n) * 3 + 5  # not 0..n-1: the split returns members, not positions
    labels = None
    if classes:
        # uneven classes, each with at least two members
        labels = np.concatenate(
            [np.repeat(np.arange(classes), 2), rng.integers(0, classes, n - 2 * classes)]
        )
        labels = rng.permutation(labels).astype(str)
    mine = train_test_split(indices, n_test, seed, labels)
    theirs = sk_split(indices, test_size=n_test, random_state=seed, stratify=labels)
    assert [a.tolist() for a in mine] == [a.tolist() for a in theirs]


def test_split_refuses_what_sklearn_refuses() -> None:
    labels = np.array(["a", "a", "b", "b", "c", "c", "c", "d"])
    for stratify, n_test in ((labels, 2), (np.array([*labels[:-1], "e"]), 4)):
        with pytest.raises(ValueError) as mine:
            train_test_split(np.arange(8), n_test, 0, stratify)
        with pytest.raises(ValueError) as theirs:
            sk_split(np.arange(8), test_size=n_test, random_state=0, stratify=stratify)
        assert str(mine.value) == str(theirs.value)


def test_numeric_statistics_equal_sklearns() -> None:
    rng = np.random.default_rng(1)
    values = rng.normal(50, 20, size=(301, 7))
    values[:, 1] = 3.25  # constant
    values[:, 2] = 1e-9 * rng.normal(size=301) + 7  # constant up to noise
    values[rng.random((301, 7)) < 0.15] = np.nan  # missing
    values[:, 3] = np.nan  # empty
    values[:, 4] = np.round(values[:, 4])  # ties for the median
    values[:200, 5] = np.nan  # mostly missing, even count left
    medians, means, scales = fit_numeric(values)
    imputer = SimpleImputer(strategy="median", keep_empty_features=True).fit(values)
    scaler = StandardScaler().fit(imputer.transform(values))
    assert medians == imputer.statistics_.tolist()
    assert means == scaler.mean_.tolist()
    assert scales == scaler.scale_.tolist()


def test_text_statistics_equal_sklearns() -> None:
    rng = np.random.default_rng(2)
    text = rng.choice(["red", "green", "blue", "Blue", "10", "9"], size=(200, 4)).astype(object)
    text[rng.random((200, 4)) < 0.2] = np.nan
    text[:, 1] = np.where(np.arange(200) % 2 == 0, "b", "a")  # a tie: the least wins
    text[:3, 1] = np.nan
    modes, categories = fit_text(text)
    imputer = SimpleImputer(strategy="most_frequent").fit(text)
    encoder = OneHotEncoder(handle_unknown="ignore").fit(imputer.transform(text))
    assert modes == [str(v) for v in imputer.statistics_]
    assert categories == [[str(c) for c in cats] for cats in encoder.categories_]


BUNDLED_SPECS = [
    {"validation": 0.2},
    {"validation": 0.2, "drop": ["DROP"]},  # the dataset's second column
    {"validation": 0.25, "test": 0.1},
    {"validation": 0.3, "test": 0.2, "task": "regression"},
    {"validation": 0.2, "test": 0.05, "task": "classification"},
]


@pytest.mark.parametrize("name", sorted(BUNDLED_DATASETS))
@pytest.mark.parametrize("options", BUNDLED_SPECS)
def test_bundled_arrays_load_exactly_as_their_frames(
    name: str, options: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bundled dataset read without pandas gives the very splits, features, targets and
    preprocessing state that its frame gives (diabetes as classes, the others as a
    regression target, included)."""
    from automl import data
    from automl.spaces import DataSpec

    if options.get("drop") == ["DROP"]:
        options = {**options, "drop": [FEATURES[name][1]]}
    spec = DataSpec(dataset=name, **options)
    for seed in (0, 7):
        try:
            arrays = data.load_dataset(spec, seed=seed)
        except DataError as exc:  # then the frame path refuses it the same way
            with monkeypatch.context() as m:
                m.setattr(data, "_bundled_values", lambda spec: None)
                with pytest.raises(DataError, match=re.escape(str(exc))):
                    data.load_dataset(spec, seed=seed)
            continue
        with monkeypatch.context() as m:
            m.setattr(data, "_bundled_values", lambda spec: None)
            frame = data.load_dataset(spec, seed=seed)
        assert (arrays.name, arrays.task) == (frame.name, frame.task)
        assert arrays.n_features == len(FEATURES[name]) - len(spec.drop)
        assert arrays.preprocessor.to_state() == frame.preprocessor.to_state()
        for split in ("X_train", "y_train", "X_val", "y_val", "X_test", "y_test"):
            a, f = getattr(arrays, split), getattr(frame, split)
            assert a.dtype == f.dtype and np.array_equal(a, f), split


def test_a_run_on_a_bundled_dataset_imports_neither_sklearn_nor_pandas(tmp_path: Path) -> None:
    space = tmp_path / "s.yaml"
    space.write_text(
        "data: {dataset: wine, validation: 0.3}\ntrain: {epochs: 1}\n"
        "space: {hidden_units: [8], batch_size: [32]}\n"
    )
    code = (
        "from automl.cli import app\n"
        f"sys.argv = ['automl', 'run', {str(space)!r}, '--n-trials', '1', "
        f"'--storage', 'sqlite:///{tmp_path / 's.db'}']\n"
        "try:\n    app()\nexcept SystemExit as exc:\n    assert exc.code in (0, None), exc.code\n"
    )
    assert imported_by("import sys\n" + code, ("sklearn", "pandas"), tmp_path) == []


def test_data_files_not_where_expected_fall_back_to_sklearns_loader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wine_data.csv").write_text("3,2,a,b\n1.0,2.0,0\n")  # another shape
    monkeypatch.setattr("automl.bundled._data_folder", lambda: tmp_path)
    for name in ("iris", "wine"):  # a missing file; a file of another shape
        frame, target = load_bundled(name)
        bunch = getattr(datasets, f"load_{name}")(as_frame=True)
        pd.testing.assert_frame_equal(frame, bunch.frame.drop(columns=["target"]))
        pd.testing.assert_series_equal(target, bunch.target)
