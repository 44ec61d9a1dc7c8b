"""The bundled datasets, read from the files scikit-learn ships without importing it
(its import costs about a second, most of a short run's start).

Each loader gives what ``sklearn.datasets.load_NAME(as_frame=True)`` gives: the same
column names, values and dtypes (a test compares them). If the files are not where
scikit-learn keeps them, its own loader is used."""

from __future__ import annotations

import csv
import gzip
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

FEATURES: dict[str, list[str]] = {
    "iris": ["sepal length (cm)", "sepal width (cm)", "petal length (cm)", "petal width (cm)"],
    "wine": [
        "alcohol",
        "malic_acid",
        "ash",
        "alcalinity_of_ash",
        "magnesium",
        "total_phenols",
        "flavanoids",
        "nonflavanoid_phenols",
        "proanthocyanins",
        "color_intensity",
        "hue",
        "od280/od315_of_diluted_wines",
        "proline",
    ],
    "digits": [f"pixel_{row}_{col}" for row in range(8) for col in range(8)],
    "diabetes": ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"],
}
_CANCER = (
    "radius",
    "texture",
    "perimeter",
    "area",
    "smoothness",
    "compactness",
    "concavity",
    "concave points",
    "symmetry",
    "fractal dimension",
)
FEATURES["breast_cancer"] = [
    *(f"mean {n}" for n in _CANCER),
    *(f"{n} error" for n in _CANCER),
    *(f"worst {n}" for n in _CANCER),
]

CSV_FILES = {"iris": "iris.csv", "wine": "wine_data.csv", "breast_cancer": "breast_cancer.csv"}


def _data_folder() -> Path | None:
    spec = importlib.util.find_spec("sklearn")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"
    return folder if folder.is_dir() else None


def _labelled_csv(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's load_csv_data: a header of counts and names, then rows of features
    and an integer label."""
    with path.open("r", encoding="utf-8") as fh:
        rows = csv.reader(fh)
        header = next(rows)
        n_samples, n_features = int(header[0]), int(header[1])
        data = np.empty((n_samples, n_features))
        target = np.empty((n_samples,), dtype=int)
        for i, row in enumerate(rows):
            data[i] = np.asarray(row[:-1], dtype=np.float64)
            target[i] = np.asarray(row[-1], dtype=int)
    return data, target


def _gzip_table(path: Path, delimiter: str | None = None) -> np.ndarray:
    with path.open("rb") as raw, gzip.open(raw, mode="rt", encoding="utf-8") as fh:
        return np.loadtxt(fh, delimiter=delimiter)


def _arrays(name: str, folder: Path) -> tuple[np.ndarray, np.ndarray]:
    if name in CSV_FILES:
        return _labelled_csv(folder / CSV_FILES[name])
    if name == "digits":
        table = _gzip_table(folder / "digits.csv.gz", delimiter=",")
        return table[:, :-1], table[:, -1].astype(int, copy=False)
    if name == "diabetes":
        data = _gzip_table(folder / "diabetes_data_raw.csv.gz")
        target = _gzip_table(folder / "diabetes_target.csv.gz")
        return _scaled(data) / data.shape[0] ** 0.5, target
    raise KeyError(name)


def _scaled(data: np.ndarray) -> np.ndarray:
    """sklearn.preprocessing.scale(data) (load_diabetes(scaled=True)), step for step."""
    out = data.copy()
    mean = np.nanmean(out, axis=0)
    std = np.nanstd(out, axis=0)
    std[std < 10 * np.finfo(std.dtype).eps] = 1.0
    out -= mean
    mean_1 = np.nanmean(out, axis=0)
    if not np.allclose(mean_1, 0):
        out -= mean_1
    out /= std
    mean_2 = np.nanmean(out, axis=0)
    if not np.allclose(mean_2, 0):
        out -= mean_2
    return out


def bundled_arrays(name: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Features (float64, one column per FEATURES[name]) and target of a bundled dataset
    read from scikit-learn's files, or None where they are missing or not as expected."""
    folder = _data_folder()
    if folder is None:
        return None
    try:
        data, target = _arrays(name, folder)
    except (OSError, ValueError):
        return None
    if data.ndim != 2 or data.shape[1] != len(FEATURES[name]) or len(target) != len(data):
        return None
    return data, target


def load_bundled(name: str) -> tuple[pd.DataFrame, pd.Series]:
    """Features and target of a bundled dataset, as ``load_NAME(as_frame=True)``."""
    import pandas as pd

    arrays = bundled_arrays(name)
    if arrays is None:  # files not as expected: scikit-learn's own loader
        return _from_sklearn(name)
    data, target = arrays
    return pd.DataFrame(data, columns=FEATURES[name], copy=False), pd.Series(target, name="target")


def _from_sklearn(name: str) -> tuple[pd.DataFrame, pd.Series]:
    from sklearn import datasets

    bunch = getattr(datasets, f"load_{name}")(as_frame=True)
    return bunch.frame.drop(columns=[bunch.target.name]), bunch.target
