"""Datasets: bundled ones, CSV/Parquet/NPZ files, preprocessing, splits, tensors on a device.

Preprocessing is fitted on the training split only and kept as plain state (lists of
numbers and strings) so a model file can carry it and load with ``weights_only=True``.
"""

from __future__ import annotations

import bz2
import gzip
import logging
import lzma
import math
import re
import warnings
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from automl.errors import DataError
from automl.spaces import BUNDLED_DATASETS, DataSpec

if TYPE_CHECKING:
    import pandas as pd
    import torch

log = logging.getLogger(__name__)

Task = Literal["classification", "regression"]
MAX_CLASSES_AUTO = 20  # an integer target with at most this many values is a class label
UNIQUE_TEXT_ROWS = 20  # from this many rows, a text column unique in each is worth a warning


@dataclass
class Preprocessor:
    """Imputation, scaling and one-hot encoding, as plain state."""

    numeric: list[str] = field(default_factory=list)
    medians: list[float] = field(default_factory=list)
    means: list[float] = field(default_factory=list)
    scales: list[float] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    modes: list[str] = field(default_factory=list)
    categories: list[list[str]] = field(default_factory=list)
    target: str | None = None
    task: Task = "classification"
    classes: list[Any] = field(default_factory=list)  # original label values, sorted
    y_mean: float = 0.0
    y_std: float = 1.0
    image_shape: list[int] | None = None  # C, H, W when the input is an image
    header: bool = True  # whether the CSV files' first row names the columns (data.header)
    dates: list[str] = field(default_factory=list)  # numeric columns read as dates (days)

    @property
    def n_features(self) -> int:
        return len(self.numeric) + sum(len(c) for c in self.categories)

    @property
    def feature_columns(self) -> list[str]:
        return [*self.numeric, *self.categorical]

    def fit(self, frame: pd.DataFrame) -> Preprocessor:
        """Fit median imputation, standard scaling and one-hot encoding on ``frame`` (the
        training split) and keep what they learned as plain lists. The statistics are
        scikit-learn's SimpleImputer, StandardScaler and OneHotEncoder ones, computed the
        same way (a test compares them) without importing scikit-learn (about 1 s)."""

        self.numeric, self.categorical, self.dates = [], [], []
        for col in frame.columns:
            series = frame[col]
            if _is_number_column(series):
                self.numeric.append(str(col))
            elif _is_date_column(series):
                self.numeric.append(str(col))
                self.dates.append(str(col))
                log.info("column '%s' holds dates: a number of days since 1970-01-01", col)
            else:
                self.categorical.append(str(col))
        self.medians, self.means, self.scales = [], [], []
        if self.numeric:
            values = _numeric_block(frame, self.numeric, self.dates)
            unread = dict(zip(self.numeric, _unread(frame, self.numeric, values), strict=True))
            for col in self.dates:
                lost = int(unread[col])
                if lost:
                    log.warning(
                        "column '%s' holds dates, but %d value(s) are not dates; they are "
                        "read as missing",
                        col,
                        lost,
                    )
            self.fit_values(self.numeric, values)
        self.modes, self.categories = [], []
        if self.categorical:
            for col in self.categorical:
                if frame[col].isna().all():
                    raise DataError(
                        f"column '{col}' has no values in the training split; "
                        f"drop it with data.drop: [{col}]"
                    )
            self.modes, self.categories = fit_text(_text_block(frame, self.categorical))
            for col, cats in zip(self.categorical, self.categories, strict=True):
                if len(cats) > 1000:
                    raise DataError(
                        f"column '{col}' has {len(cats)} distinct text values and cannot be "
                        f"one-hot encoded sensibly; drop it with data.drop: [{col}]"
                    )
                if len(cats) >= UNIQUE_TEXT_ROWS and len(cats) == len(frame):
                    log.warning(
                        "column '%s' has a different text value in every training row (an "
                        "id or a name?): as a feature it can only be memorised; consider "
                        "data.drop: [%s]",
                        col,
                        col,
                    )
        return self

    def fit_values(self, columns: list[str], values: np.ndarray) -> Preprocessor:
        """Fit the numeric columns ``columns`` from their float64 ``values`` (the
        training split's, NaN missing), as ``fit`` fits a frame's numeric columns."""
        if values.size:
            with np.errstate(invalid="ignore"):
                largest = np.nanmax(np.where(np.isnan(values), 0.0, np.abs(values)), axis=0)
            for col, big in zip(columns, largest, strict=True):
                if big > LARGEST_VALUE:
                    raise DataError(
                        f"column '{col}' holds values up to {big:.3g}, too large to scale; "
                        f"rescale it (a log, or a division by a power of ten) or drop it "
                        f"with data.drop: [{col}]"
                    )
        self.numeric = list(columns)
        self.medians, self.means, self.scales = fit_numeric(values)
        return self

    def scale_values(self, values: np.ndarray) -> np.ndarray:
        """The numeric columns' float64 ``values`` imputed and scaled, as ``transform``."""
        values = np.where(np.isnan(values), np.asarray(self.medians, dtype=np.float64), values)
        return (values - np.asarray(self.means)) / np.asarray(self.scales)

    def transform(self, frame: pd.DataFrame, *, warn: str | None = None) -> np.ndarray:
        """Features as float32, in the order fixed by ``fit``. With ``warn`` (the file's
        name), say how many values of a column could not be used as trained: text in a
        numeric column (read as missing), categories never seen in training (all zeros)."""
        missing = [c for c in self.feature_columns if c not in frame.columns]
        if missing:
            raise DataError(
                f"the data lacks feature column(s) {', '.join(missing)} that the model needs"
            )
        n = len(frame)
        k = len(self.numeric)
        # One float32 array written in place: numeric columns a block of rows at a time
        # (float64 copies of a whole large file cost gigabytes), one-hot columns by index.
        out = np.zeros((n, self.n_features), dtype=np.float32)
        lost = np.zeros(k, dtype=np.int64)
        too_large = np.zeros(k, dtype=np.int64)
        medians = self.scale_values(np.full((1, k), np.nan))
        for first in range(0, n if k else 0, TRANSFORM_ROWS):
            rows = frame.iloc[first : first + TRANSFORM_ROWS]
            values = _numeric_block(rows, self.numeric, self.dates)
            lost += _unread(rows, self.numeric, values)
            with np.errstate(over="ignore"):  # an overflow is caught just below
                scaled = self.scale_values(values)
            # A value far outside what training saw (1e300 where the column held units)
            # would become inf in float32 and the row's output NaN: read as missing.
            huge = np.abs(scaled) > np.finfo(np.float32).max
            if huge.any():
                scaled = np.where(huge, medians, scaled)
                too_large += huge.sum(axis=0)
            out[first : first + len(rows), :k] = scaled
        if warn is not None:
            for col, count, big in zip(self.numeric, lost, too_large, strict=True):
                if count:
                    log.warning(
                        "%s: %d value(s) of %s column '%s' are not %s; they are read as missing",
                        warn,
                        count,
                        "date" if col in self.dates else "numeric",
                        col,
                        "dates" if col in self.dates else "numbers",
                    )
                if big:
                    log.warning(
                        "%s: %d value(s) of numeric column '%s' are too large for the "
                        "model; they are read as missing",
                        warn,
                        big,
                        col,
                    )
        offset = k
        for j, col in enumerate(self.categorical):
            strings = _text_series(frame[col]).fillna(self.modes[j]).reset_index(drop=True)
            index, numbers = _category_index(self.categories[j])
            position = strings.map(index).to_numpy(dtype=np.float64, copy=True)  # NaN: unknown
            unknown = np.isnan(position)
            if unknown.any():  # 2.0 read where training read 2 (a column seen as floats)
                others = strings[unknown]
                by_number = {v: numbers.get(_number_key(v)) for v in others.unique()}
                position[unknown] = others.map(by_number).to_numpy(dtype=np.float64)
            found = ~np.isnan(position)
            out[np.flatnonzero(found), offset + position[found].astype(np.int64)] = 1.0
            unseen = strings[~found]  # unknown categories are all zeros
            if len(unseen) and warn is not None:
                counts = unseen.value_counts()
                shown = ", ".join(repr(v) for v in counts.index[:5])
                log.warning(
                    "%s: %d value(s) of column '%s' are categories not seen in training "
                    "(%s); they are encoded as none of the known ones",
                    warn,
                    len(unseen),
                    col,
                    shown,
                )
            offset += len(index)
        return out

    def encode_target(self, values: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            index = {_label_key(c): i for i, c in enumerate(self.classes)}
            # Each distinct label looked up once, not each row (5M rows: seconds).
            codes, uniques = _factorize(values)
            try:
                table = np.array([index[_label_key(v)] for v in uniques], dtype=np.int64)
            except KeyError as exc:
                raise DataError(f"unknown class label {exc.args[0]!r} in the target") from None
            return table[codes]
        y = values.astype(np.float64)
        return ((y - self.y_mean) / self.y_std).astype(np.float32)

    def decode_target(self, encoded: np.ndarray) -> np.ndarray:
        if self.task == "classification":
            return np.array(self.classes, dtype=object)[encoded]
        return encoded.astype(np.float64) * self.y_std + self.y_mean

    def to_state(self) -> dict[str, Any]:
        """Plain, ``weights_only``-loadable state."""
        state = dict(self.__dict__)
        state["classes"] = [_plain(c) for c in self.classes]
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Preprocessor:
        return cls(**{k: v for k, v in state.items() if k in cls.__dataclass_fields__})


# A text column is read as numbers when at most this share of its values are not numbers
# (a stray '-', 'n/a?' or ' '), and its numbers are many and varied (not codes 1, 2, 3).
STRAY_SHARE = 0.05
STRAY_MIN_NUMBERS = 20
STRAY_MIN_DISTINCT = 10


def _numbers_with_strays(frame: pd.DataFrame, path: str | Path, target: str | None) -> None:
    """Read as numbers, in place, the text columns that are numbers but for a few stray
    tokens, which become missing values, with a warning naming them. One '-' in a column
    of measurements made it text: a one-hot 'category' per distinct number."""
    import pandas as pd

    for col in frame.columns:
        series = frame[col]
        if _is_number_column(series) or not (
            pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)
        ):
            continue  # (numbers, booleans, dates, categoricals: as they are)
        present = series.notna()
        numbers = pd.to_numeric(series, errors="coerce")
        n_numbers = int(numbers.notna().sum())
        strays = series[present & numbers.isna()]
        if (
            strays.empty
            or numbers.nunique() < STRAY_MIN_DISTINCT
            or n_numbers < STRAY_MIN_NUMBERS
            or len(strays) > STRAY_SHARE * int(present.sum())
        ):
            if col != target:  # (a target's text is its own matter: classes, or refused)
                _text_that_looks_numeric(series[present], strays, col, path)
            continue
        shown = ", ".join(repr(str(v)) for v in list(dict.fromkeys(strays.tolist()))[:5])
        log.warning(
            "column '%s' of %s is numbers but for %d value(s) (%s), read as missing; "
            "leave such cells empty to say so",
            col,
            path,
            len(strays),
            shown,
        )
        frame[col] = numbers


def _text_that_looks_numeric(
    present: pd.Series, strays: pd.Series, col: Any, path: str | Path
) -> None:
    """Warn of a text column that is mostly numbers, or numbers written with thousands
    separators: it is one-hot encoded as categories, which the user may not mean."""
    import pandas as pd

    if len(present) < STRAY_MIN_NUMBERS:
        return
    grouped = pd.to_numeric(
        present.astype(str).str.replace(r"(?<=\d)[,'  ](?=\d{3}(?:\D|$))", "", regex=True),
        errors="coerce",
    )
    if grouped.notna().mean() >= 0.9 and len(strays) > 0.5 * len(present):
        example = str(present[grouped.notna() & strays.reindex(present.index).notna()].iloc[0])
        log.warning(
            "column '%s' of %s holds numbers written with thousands separators (%r): "
            "they are read as text categories; write them without separators",
            col,
            path,
            example,
        )
    elif len(strays) and len(present) - len(strays) >= 0.5 * len(present):
        shown = ", ".join(repr(str(v)) for v in list(dict.fromkeys(strays.tolist()))[:5])
        log.warning(
            "column '%s' of %s is mostly numbers, but %d value(s) (%s) are text, so it is "
            "read as categories; if they mean missing, leave those cells empty",
            col,
            path,
            len(strays),
            shown,
        )


def _is_number_column(series: pd.Series) -> bool:
    import pandas as pd

    return bool(pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series))


# Rows of numeric columns scaled at once in ``Preprocessor.transform`` (its float64
# copies, about 50 MB a block at 50 columns, instead of the whole file's).
TRANSFORM_ROWS = 131_072

# Numbers a column may hold and still be standardised in float64 (the square of a larger
# one overflows): beyond it a column is refused with advice, not trained into NaN.
LARGEST_VALUE = 1e150


def fit_numeric(values: np.ndarray) -> tuple[list[float], list[float], list[float]]:
    """Per column of ``values`` (float64, NaN missing): the median of what is present (0
    for an empty column), then the mean and scale of the column with its median filled
    in (scale 1 for a constant column). As scikit-learn's SimpleImputer(strategy="median",
    keep_empty_features=True) and StandardScaler compute them, operation for operation."""
    with warnings.catch_warnings():  # ("All-NaN slice": an empty column, 0 below)
        warnings.simplefilter("ignore", RuntimeWarning)
        # The median of what is present, as np.ma.median gives it, 10x faster.
        medians = np.nanmedian(values, axis=0) if len(values) else np.full(values.shape[1], np.nan)
    medians = np.asarray(medians, dtype=np.float64)
    medians[np.isnan(medians)] = 0.0  # an empty column
    filled = np.where(np.isnan(values), medians, values)
    count = np.full(filled.shape[1], float(filled.shape[0]))
    total = filled.sum(axis=0)
    mean = total / count
    deviation = filled - total / count
    correction = deviation.sum(axis=0)
    deviation **= 2
    var = (deviation.sum(axis=0) - correction**2 / count) / count
    eps = np.finfo(np.float64).eps
    constant = var <= count * eps * var + (count * mean * eps) ** 2
    scale = np.sqrt(var)
    scale[constant] = 1.0
    return [float(v) for v in medians], [float(v) for v in mean], [float(v) for v in scale]


def fit_text(text: np.ndarray) -> tuple[list[str], list[list[str]]]:
    """Per column of ``text`` (strings, NaN missing): the most frequent value (the least
    of tied ones), and the sorted categories once missing values take it. As
    scikit-learn's SimpleImputer(strategy="most_frequent") and OneHotEncoder."""
    modes: list[str] = []
    categories: list[list[str]] = []
    for j in range(text.shape[1]):
        column = text[:, j]
        missing = _is_missing(column)
        counts = Counter(column[~missing])
        top = max(counts.values())
        mode = min(value for value, n in counts.items() if n == top)
        modes.append(str(mode))
        categories.append(sorted({str(v) for v in column[~missing]}))
    return modes, categories


def train_test_split(
    indices: np.ndarray, n_test: int, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """``indices`` split into (train, test) with ``n_test`` test rows, shuffled with
    ``seed``, stratified by the labels ``stratify``: scikit-learn's train_test_split
    (ShuffleSplit, StratifiedShuffleSplit) step for step with the same NumPy random
    stream, so a split is the one it gives (a test compares them). ValueError as it."""
    n = len(indices)
    if n_test >= n or n_test <= 0:
        raise ValueError(
            f"test_size={n_test} should be either positive and smaller than the number "
            f"of samples {n} or a float in the (0, 1) range"
        )
    n_train = n - n_test
    rng = np.random.RandomState(seed)
    if stratify is None:
        permutation = rng.permutation(n)
        return indices[permutation[n_test:n]], indices[permutation[:n_test]]
    classes, y_indices, class_counts = np.unique(stratify, return_inverse=True, return_counts=True)
    if np.min(class_counts) < 2:
        too_few = classes[class_counts < 2].tolist()
        raise ValueError(
            "The least populated classes in y have only 1 member, which is too few. The "
            "minimum number of groups for any class cannot be less than 2. Classes with "
            f"too few members are: {too_few}"
        )
    if n_train < len(classes):
        raise ValueError(
            f"The train_size = {n_train} should be greater or equal to the number of "
            f"classes = {len(classes)}"
        )
    if n_test < len(classes):
        raise ValueError(
            f"The test_size = {n_test} should be greater or equal to the number of "
            f"classes = {len(classes)}"
        )
    class_indices = np.split(np.argsort(y_indices, kind="stable"), np.cumsum(class_counts)[:-1])
    n_i = _approximate_mode(class_counts, n_train, rng)
    t_i = _approximate_mode(class_counts - n_i, n_test, rng)
    train: list[int] = []
    test: list[int] = []
    for i in range(len(classes)):
        permutation = rng.permutation(class_counts[i])
        members = class_indices[i].take(permutation, mode="clip")
        train.extend(members[: n_i[i]])
        test.extend(members[n_i[i] : n_i[i] + t_i[i]])
    return indices[rng.permutation(train)], indices[rng.permutation(test)]


def _approximate_mode(
    class_counts: np.ndarray, n_draws: int, rng: np.random.RandomState
) -> np.ndarray:
    """How many of ``n_draws`` each class gets: proportional, floored, the rest to the
    largest remainders with ties broken at random (scikit-learn's _approximate_mode)."""
    continuous = class_counts / class_counts.sum() * n_draws
    floored = np.floor(continuous)
    need_to_add = int(n_draws - floored.sum())
    if need_to_add > 0:
        remainder = continuous - floored
        for value in np.sort(np.unique(remainder))[::-1]:
            (inds,) = np.where(remainder == value)
            add_now = min(len(inds), need_to_add)
            inds = rng.choice(inds, size=add_now, replace=False)
            floored[inds] += 1
            need_to_add -= add_now
            if need_to_add == 0:
                break
    return floored.astype(int)


def _numeric_block(
    frame: pd.DataFrame, columns: list[str], dates: Sequence[str] = ()
) -> np.ndarray:
    """Numeric columns as float64 with NaN for anything missing, non-numeric or infinite;
    the ``dates`` among them as days since 1970-01-01."""
    import pandas as pd

    block = np.empty((len(frame), len(columns)), dtype=np.float64)
    for j, col in enumerate(columns):
        if col in dates:
            block[:, j] = _date_days(frame[col])
            continue
        numbers = pd.to_numeric(frame[col], errors="coerce")
        block[:, j] = numbers.to_numpy(dtype=np.float64, na_value=np.nan)
    block[~np.isfinite(block)] = np.nan
    return block


# ISO 8601 dates, with an optional time and zone: what a text column must hold (in 95% of
# a sample of its values) to be read as dates. Other spellings (03/04/2024: March or
# April?) stay text.
_ISO_DATE = re.compile(
    r"^\d{4}-\d{2}-\d{2}(?:[ T]\d{2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
)


def _is_date_column(series: pd.Series) -> bool:
    """A datetime column, or text that is ISO dates (a one-hot category per day could
    not be used on later dates, and past 1000 days the column was refused)."""
    import pandas as pd

    if pd.api.types.is_datetime64_any_dtype(series):
        return True
    if not (pd.api.types.is_object_dtype(series) or pd.api.types.is_string_dtype(series)):
        return False
    sample = series.dropna().astype(str).str.strip().head(1000)
    if len(sample) < 5 or sample.str.match(_ISO_DATE).mean() < 0.95:
        return False
    return bool(np.isfinite(_date_days(sample)).mean() >= 0.95)


def _date_days(series: pd.Series) -> np.ndarray:
    """Days since 1970-01-01 (UTC; a date without a zone taken as UTC), NaN where the
    value is missing or not a date."""
    import pandas as pd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (pandas on mixed formats)
        stamps = pd.to_datetime(series, errors="coerce", utc=True, format="ISO8601")
    # In whole seconds, not pandas' nanoseconds: 9999-12-31 ("no end date") and year 1
    # are dates too, outside what a nanosecond timestamp holds (1677-2262).
    moments = np.asarray(stamps.dt.tz_convert(None).to_numpy())
    seconds = moments.astype("datetime64[s]").astype(np.int64).astype(np.float64)
    seconds[np.isnat(moments)] = np.nan
    return seconds / 86400.0


def _unread(frame: pd.DataFrame, columns: list[str], values: np.ndarray) -> np.ndarray:
    """Per column, the values given in ``frame`` that ``values`` (its _numeric_block)
    could not read: text in a numeric column, not a date in a date column, infinities."""
    return (frame[columns].notna().to_numpy() & np.isnan(values)).sum(axis=0)


def _text_series(series: pd.Series) -> pd.Series:
    """A categorical column as strings (as ``_text_block`` writes them), NaN missing."""
    present = series.notna()
    return series.astype(str).where(present)


def _text_block(frame: pd.DataFrame, columns: list[str]) -> np.ndarray:
    """Categorical columns as an object array of strings, NaN where missing."""
    block = np.empty((len(frame), len(columns)), dtype=object)
    for j, col in enumerate(columns):
        block[:, j] = _text_series(frame[col]).to_numpy(dtype=object, na_value=np.nan)
    return block


def _number_key(text: str) -> float | None:
    """The number a category's text writes (``2``, ``2.0``, ``02``), or None."""
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def _category_index(categories: Sequence[str]) -> tuple[dict[str, int], dict[float | None, int]]:
    """Each category's position, by its text and, for numbers that only one category
    writes, by its value: a column of codes read as integers in training (``2``) and as
    floats in a file where a value is missing (``2.0``) names the same category."""
    index = {c: i for i, c in enumerate(categories)}
    by_value: dict[float | None, list[int]] = {}
    for text, i in index.items():
        key = _number_key(text)
        if key is not None:
            by_value.setdefault(key, []).append(i)
    return index, {k: v[0] for k, v in by_value.items() if len(v) == 1}


def _is_missing(column: np.ndarray) -> np.ndarray:
    return np.array([isinstance(v, float) and math.isnan(v) for v in column], dtype=bool)


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(codes, distinct values) of a target: NumPy's for numbers (no pandas import for a
    bundled dataset), pandas' for text and mixed objects."""
    arr = np.asarray(values)
    if arr.dtype != object:
        uniques, codes = np.unique(arr, return_inverse=True)
        return codes.reshape(-1), uniques
    import pandas as pd

    codes, uniques = pd.factorize(arr, use_na_sentinel=False)
    return codes, np.asarray(uniques, dtype=object)


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    return value


def _label_key(value: Any) -> Any:
    value = _plain(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


@dataclass
class Dataset:
    """Preprocessed splits as numpy arrays (features float32; targets encoded)."""

    name: str
    task: Task
    preprocessor: Preprocessor
    X_train: np.ndarray
    y_train: np.ndarray
    X_val: np.ndarray
    y_val: np.ndarray
    X_test: np.ndarray
    y_test: np.ndarray

    @property
    def n_classes(self) -> int:
        return len(self.preprocessor.classes) if self.task == "classification" else 0

    @property
    def n_features(self) -> int:
        return int(self.X_train.shape[1])

    @property
    def n_outputs(self) -> int:
        return self.n_classes if self.task == "classification" else 1

    @property
    def input_shape(self) -> tuple[int, ...]:
        shape = self.preprocessor.image_shape
        return tuple(shape) if shape else (self.n_features,)


@dataclass
class DeviceData:
    """Splits as tensors on one device, shaped for the model."""

    X_train: torch.Tensor
    y_train: torch.Tensor
    X_val: torch.Tensor
    y_val: torch.Tensor
    task: Task
    n_outputs: int
    input_shape: tuple[int, ...]
    y_std: float = 1.0


# The bundled datasets whose rows are images: C, H, W.
BUNDLED_IMAGE_SHAPES: dict[str, list[int]] = {"digits": [1, 8, 8]}


def _bundled_frame(name: str) -> tuple[pd.DataFrame, pd.Series, list[int] | None]:
    from automl.bundled import load_bundled

    frame, target = load_bundled(name)
    return frame, target, _bundled_image_shape(name)


def _bundled_image_shape(name: str) -> list[int] | None:
    shape = BUNDLED_IMAGE_SHAPES.get(name)
    return list(shape) if shape is not None else None  # a copy: the preprocessor keeps it


def read_table(
    path: str | Path,
    *,
    header: bool = True,
    missing_hint: str = "check data.path (relative to the space file)",
) -> tuple[pd.DataFrame, list[int] | None]:
    """Read a CSV, Parquet or NPZ file into a frame; NPZ images are flattened. A CSV read
    without ``header`` has no names in its first row: its columns are x0, x1, ... (as an
    NPZ file's table)."""
    import pandas as pd

    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such data file; {missing_hint}")
    if p.is_dir():
        raise DataError(f"{p}: is a folder, not a data file")
    compressed = p.suffix.lower() in COMPRESSIONS and len(p.suffixes) > 1
    suffix = _table_kind(p)  # data.csv.gz: pandas reads it through the compression it names
    try:
        if suffix in CSV_SUFFIXES:
            kind = None if compressed else _binary_kind(p)
            if kind:
                raise DataError(f"{p}: is {kind}")
            sep, decimal = ("\t", ".") if suffix == ".tsv" else _sniff_csv(p)
            try:
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", pd.errors.ParserWarning)
                    frame = pd.read_csv(
                        p,
                        sep=sep,
                        decimal=decimal,
                        na_values=CSV_MISSING,
                        header=0 if header else None,
                        # A first row one field longer than the header is refused like
                        # any ragged row, not read as an index that shifts every column
                        # against its name (pandas then cuts it and warns).
                        index_col=False,
                    )
            except pd.errors.EmptyDataError:
                raise DataError(f"{p}: the file is empty; it needs a header and rows") from None
            if any("Length of header" in str(w.message) for w in caught):
                line = 2 if header else 1
                raise DataError(
                    f"{p}: cannot read the data file: line {line} has more fields than "
                    f"the {frame.shape[1]} the header names{RAGGED_HINT}"
                )
            if frame.empty:
                raise DataError(f"{p}: has a header but no rows")
            if header:
                _refuse_duplicate_names(p, frame, sep)
            frame.columns = (
                [str(c).strip() for c in frame.columns]
                if header
                else [f"x{i}" for i in range(frame.shape[1])]
            )
            frame.attrs["csv"] = {"sep": sep, "decimal": decimal, "header": header}
            return frame, None
        if suffix in (".parquet", ".pq"):
            frame = pd.read_parquet(p)
            if frame.empty:
                raise DataError(f"{p}: has no rows")
            frame.columns = [str(c) for c in frame.columns]
            return frame, None
        if suffix == ".npz":
            return _read_npz(p)
    except DataError:
        raise
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{p}: cannot read the data file: it is not UTF-8 text ({exc.reason} at byte "
            f"{exc.start}); save it as UTF-8"
        ) from None
    except Exception as exc:  # (pyarrow and friends raise their own types too)
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        twice = re.match(r"Multiple matches for FieldRef\.Name\((.*?)\)", first)
        if twice:  # pyarrow's words for a Parquet file naming a column twice
            raise DataError(
                f"{p}: the file names column '{twice.group(1)}' more than once; give every "
                "column its own name"
            ) from None
        hint = _parse_hint(first) if isinstance(exc, (OSError, ValueError, KeyError)) else ""
        raise DataError(f"{p}: cannot read the data file: {first}{hint}") from None
    kind = "".join(p.suffixes[-2:]) if compressed else suffix
    raise DataError(
        f"{p}: unsupported file type '{kind}'; use .csv (or .csv.gz, .csv.bz2, .csv.xz), "
        ".parquet or .npz"
    )


def _refuse_duplicate_names(p: Path, frame: pd.DataFrame, sep: str) -> None:
    """Refuse a CSV header that names a column twice: pandas renames the second ``a`` to
    ``a.1``, so ``data.drop: [a]`` would drop one and train on the other."""
    import pandas as pd

    stripped = [str(c).strip() for c in frame.columns]
    names = set(stripped)
    if len(names) < len(stripped):  # 'a' and 'a ' are both a
        header = stripped
    elif any(m and m.group(1) in names for m in map(_MANGLED.match, names)):
        # (the header is read again only where pandas may have renamed a column)
        header = [str(c).strip() for c in pd.read_csv(p, sep=sep, header=None, nrows=1).iloc[0]]
    else:
        return
    counts = Counter(header)
    twice = [name for name, n in counts.items() if n > 1]
    if twice:
        raise DataError(
            f"{p}: the header names column '{twice[0]}' {counts[twice[0]]} times; give "
            "every column its own name"
        )


_MANGLED = re.compile(r"^(.*)\.\d+$")


# Binary files named like text, by their first bytes, and what to do with each.
BINARY_KINDS = {
    b"PAR1": "a Parquet file, not CSV text; name it .parquet",
    b"PK\x03\x04": "a zip archive (an Excel workbook?), not CSV text; save the sheet as CSV",
}


def _binary_kind(p: Path) -> str | None:
    try:
        with p.open("rb") as fh:
            head = fh.read(4)
    except OSError:
        return None
    return BINARY_KINDS.get(head)


# What to do about a row whose fields do not match the header's.
RAGGED_HINT = (
    "; every row needs as many fields as the header: quote values that hold the "
    "delimiter, or check the file's delimiter"
)


def _parse_hint(message: str) -> str:
    """What to do about pandas' CSV parser errors."""
    if "Expected" in message and "fields" in message:
        return RAGGED_HINT
    if "EOF inside string" in message or "EOF in" in message:
        return '; a quote (") is opened and never closed: close it, or remove it'
    return ""


# Read as missing in a CSV besides pandas' own markers (NA, NaN, null, empty, ...): '?',
# as the UCI repository's files write it (a numeric column with '?' would become text).
CSV_MISSING = ["?"]

# Text tables read as CSV (UCI's files end in .data); .tsv is tab-separated.
CSV_SUFFIXES = (".csv", ".txt", ".tsv", ".data")


def _table_kind(p: Path) -> str:
    """A data file's type by its suffix, a compression's left aside: .csv for t.csv.gz."""
    suffix = p.suffix.lower()
    if suffix in COMPRESSIONS and len(p.suffixes) > 1:
        return p.suffixes[-2].lower()
    return suffix


# Compressed CSV files read as such (data.csv.gz ...): the suffix and how to open it.
COMPRESSIONS: dict[str, Any] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}

# Delimiters a CSV may use, in order of preference where several fit.
CSV_DELIMITERS = (",", ";", "\t", "|")
_DECIMAL_COMMA = re.compile(r"^-?\d+,\d+$")
_DECIMAL_POINT = re.compile(r"^-?\d*\.\d+$")


def _sniff_csv(p: Path, sample_bytes: int = 64 * 1024) -> tuple[str, str]:
    """The delimiter and decimal mark of a CSV file: the first of CSV_DELIMITERS that
    splits the header and the first rows into the same number of fields (more than one),
    else ','; and ',' as the decimal mark where the delimiter is not a comma and numbers
    are written 1,5 (spreadsheets in many locales save such files), else '.'."""
    import csv
    import io

    opener = COMPRESSIONS.get(p.suffix.lower(), open)  # a CSV file's own suffix, or .gz ...
    try:
        with opener(p, "rt", encoding="utf-8-sig", errors="replace", newline="") as fh:
            sample = fh.read(sample_bytes)
    except (OSError, EOFError, ValueError):  # not what its name says: pandas will tell
        return ",", "."
    lines = sample.splitlines()
    if len(sample) == sample_bytes and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut
    lines = [line for line in lines if line.strip()][:20]
    if not lines:
        return ",", "."
    for delimiter in CSV_DELIMITERS:
        rows = list(csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter))
        widths = {len(row) for row in rows}
        if len(widths) == 1 and widths.pop() > 1:
            break
    else:
        return ",", "."
    if delimiter == ",":
        return ",", "."
    cells = [cell.strip() for row in rows[1:] for cell in row]
    commas = any(_DECIMAL_COMMA.match(c) for c in cells)
    points = any(_DECIMAL_POINT.match(c) for c in cells)
    return delimiter, "," if commas and not points else "."


def _read_npz(p: Path) -> tuple[pd.DataFrame, list[int] | None]:
    import pandas as pd

    try:
        loaded = np.load(p, allow_pickle=False)
    except ValueError as exc:
        if "pickle" not in str(exc):
            raise
        raise DataError(
            f"{p}: not an NPZ archive of arrays; save one with numpy.savez(path, X=..., y=...)"
        ) from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):  # a single .npy array renamed .npz
        raise DataError(
            f"{p}: holds a single array, not an NPZ archive; save one with "
            "numpy.savez(path, X=..., y=...)"
        )
    with loaded as arrays:
        if "X" not in arrays:
            raise DataError(f"{p}: an NPZ file needs an array named X (and y for training)")
        try:
            X = np.asarray(arrays["X"])
            y = np.asarray(arrays["y"]) if "y" in arrays else None
        except ValueError as exc:
            if "pickle" not in str(exc):
                raise
            raise DataError(
                f"{p}: X and y must be arrays of numbers or text, not Python objects; save "
                "text labels with y.astype(str)"
            ) from None
    if X.ndim not in (2, 3, 4) or X.shape[0] == 0:
        raise DataError(f"{p}: X must be NxF, NxHxW or NxCxHxW with N > 0, got {X.shape}")
    if not np.issubdtype(X.dtype, np.number) or np.iscomplexobj(X):
        raise DataError(f"{p}: X must be real numbers, got dtype {X.dtype}")
    if y is not None and y.ndim > 1 and math.prod(y.shape[1:]) != 1:
        raise DataError(
            f"{p}: y must hold one value per row, got shape {y.shape}; for one-hot labels "
            "save y.argmax(axis=1)"
        )
    image_shape: list[int] | None = None
    if X.ndim == 3:
        image_shape = [1, int(X.shape[1]), int(X.shape[2])]
    elif X.ndim == 4:
        image_shape = [int(s) for s in X.shape[1:]]
    flat = X.reshape(X.shape[0], -1)
    if not np.issubdtype(flat.dtype, np.floating) or np.nanmax(np.abs(flat), initial=0) < 3e38:
        flat = flat.astype(np.float32)  # (beyond float32's range: kept, refused with advice)
    frame = pd.DataFrame(flat, columns=[f"x{i}" for i in range(flat.shape[1])])
    if y is not None:
        if y.shape[0] != X.shape[0]:
            raise DataError(f"{p}: X has {X.shape[0]} rows but y has {y.shape[0]}")
        frame["y"] = y.reshape(y.shape[0], -1)[:, 0] if y.ndim > 1 else y
    return frame, image_shape


def _headerless_hint(frame: pd.DataFrame) -> str:
    """A hint for a CSV whose first row, read as column names, looks like data: half or
    more of the names are numbers."""
    names = [str(c) for c in frame.columns]
    numbers = 0
    for name in names:
        try:
            float(name)
        except ValueError:
            continue
        numbers += 1
    if len(names) < 2 or numbers * 2 < len(names):
        return ""
    return (
        f"; its first row ({', '.join(names[:5])}{', ...' if len(names) > 5 else ''}) looks "
        f"like data, not column names: add 'header: false' under data, and its columns are "
        f"x0 .. x{len(names) - 1} (data.target: x{len(names) - 1} for the last)"
    )


def _is_row_index(column: pd.Series) -> bool:
    """Whether ``column`` is 0..n-1 or 1..n in order, as pandas' ``to_csv`` writes a frame's
    index (in a column with no header, which pandas reads back as 'Unnamed: 0')."""
    import pandas as pd

    if not pd.api.types.is_integer_dtype(column) or len(column) < 2:
        return False
    values = column.to_numpy()
    start = int(values[0])
    return start in (0, 1) and bool(np.array_equal(values, np.arange(start, start + len(values))))


# The largest CSV whose class labels are read a second time, as text (a column of a big
# file costs a parse of the whole file).
LABELS_REREAD_BYTES = 256 * 2**20


def _labels_as_written(spec: DataSpec, frame: pd.DataFrame, column: str) -> pd.Series | None:
    """A CSV target of class labels that read as numbers, as the file writes them, when
    reading them as numbers merged some ('01' and '1' are both 1): the labels keep their
    original values. None when nothing was merged, or the target is not classes."""
    import pandas as pd

    options = frame.attrs.get("csv")
    target = frame[column]
    if options is None or spec.path is None or not _is_number_column(target):
        return None
    task = spec.task if spec.task != "auto" else infer_task(target)
    if task != "classification" or Path(spec.path).stat().st_size > LABELS_REREAD_BYTES:
        return None
    texts = pd.read_csv(
        spec.path,
        sep=options["sep"],
        decimal=options["decimal"],
        na_values=CSV_MISSING,
        header=0 if options["header"] else None,
        usecols=[list(frame.columns).index(column)],
        dtype=str,
    ).iloc[:, 0]
    texts = texts.str.strip()
    if len(texts) != len(target) or texts.nunique() <= target.nunique():
        return None
    texts.index = target.index
    texts.name = target.name
    return texts


def infer_task(target: pd.Series) -> Task:
    """The ``task: auto`` rule: text, booleans or categories are classes; numbers that are
    all integers with at most 20 distinct values are classes; other numbers are regression.
    """
    import pandas as pd

    values = target.dropna()
    if not pd.api.types.is_numeric_dtype(values) or pd.api.types.is_bool_dtype(values):
        return "classification"
    as_float = values.astype(np.float64)
    if np.all(np.mod(as_float, 1) == 0) and values.nunique() <= MAX_CLASSES_AUTO:
        return "classification"
    return "regression"


def load_frame(spec: DataSpec) -> tuple[str, pd.DataFrame, pd.Series, list[int] | None]:
    """The raw features and target of a data spec, before any split."""
    if spec.dataset is not None:
        frame, target, image_shape = _bundled_frame(spec.dataset)
        if spec.drop:
            kept = bundled_columns(spec.dataset, spec.drop)
            frame, image_shape = frame.iloc[:, kept], None
        return spec.dataset, frame, target, image_shape
    assert spec.path is not None
    if not spec.header and _table_kind(Path(spec.path)) not in CSV_SUFFIXES:
        raise DataError(
            f"{spec.path}: data.header applies to CSV files; remove it for this file type"
        )
    frame, image_shape = read_table(spec.path, header=spec.header)
    if frame.attrs.get("csv", {}).get("header"):  # a CSV's names are read stripped
        spec = spec.model_copy(
            update={
                "target": spec.target.strip() if spec.target else spec.target,
                "drop": tuple(c.strip() for c in spec.drop),
            }
        )
    assert spec.path is not None
    _numbers_with_strays(frame, spec.path, target=spec.target or "y")
    target_col = spec.target or ("y" if image_shape is not None or "y" in frame.columns else None)
    if target_col is None:
        raise DataError(
            f"{spec.path}: say which column to predict with data.target "
            f"(columns: {', '.join(map(str, frame.columns[:10]))}){_headerless_hint(frame)}"
        )
    if target_col not in frame.columns:
        import difflib

        columns = [str(c) for c in frame.columns]
        same = [c for c in columns if c.lower() == target_col.lower()]  # 'mpg' for 'MPG'
        close = same or difflib.get_close_matches(target_col, columns, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else _headerless_hint(frame)
        raise DataError(f"{spec.path}: target column '{target_col}' is not in the file{hint}")
    missing_drop = [c for c in spec.drop if c not in frame.columns]
    if missing_drop:
        raise DataError(f"{spec.path}: data.drop names unknown column(s) {', '.join(missing_drop)}")
    if target_col in spec.drop:
        log.warning(
            "data.drop names the target '%s' of %s: the target is never a feature; "
            "remove it from data.drop",
            target_col,
            spec.path,
        )
    written = _labels_as_written(spec, frame, target_col)
    if written is not None:
        frame[target_col] = written
    target = frame[target_col]
    if _is_number_column(target):  # an infinite target is as unusable as a missing one
        target = target.where(np.isfinite(target.to_numpy(dtype=np.float64, na_value=np.nan)))
    n_missing = int(target.isna().sum())
    if n_missing == len(target):
        raise DataError(f"{spec.path}: target column '{target_col}' is entirely empty")
    # Columns without a header that carry nothing: a saved row index, or the empty column
    # a delimiter at the end of every line makes.
    headerless = [
        c
        for c in frame.columns
        if str(c).startswith("Unnamed: ") and c != target_col and c not in spec.drop
    ]
    ignored = []
    for column in headerless:
        if _is_row_index(frame[column]):
            why = "a saved row index (0, 1, 2, ...), which would only tell the rows' order"
        elif frame[column].isna().all():
            why = "entirely empty (a delimiter at the end of each line)"
        else:
            continue
        log.warning("ignored column '%s' of %s, which has no header: %s", column, spec.path, why)
        ignored.append(column)
    dropped = [c for c in spec.drop if c != target_col]
    features = frame.drop(columns=[target_col, *dropped, *ignored])
    if n_missing:
        log.warning(
            "dropped %d row(s) of %s whose target '%s' is missing (or infinite)",
            n_missing,
            spec.path,
            target_col,
        )
        keep = target.notna().to_numpy()
        features, target = features[keep], target[keep]
    features = features.reset_index(drop=True)
    target = target.reset_index(drop=True)
    if features.shape[1] == 0:
        raise DataError(f"{spec.path}: no feature columns left after the target and data.drop")
    empty_cols = [str(c) for c in features.columns if features[c].isna().all()]
    if empty_cols:
        raise DataError(
            f"{spec.path}: column(s) {', '.join(empty_cols)} are entirely empty; "
            f"drop them with data.drop"
        )
    return Path(spec.path).stem, features, target, image_shape


def load_dataset(spec: DataSpec, *, seed: int = 0, fit_on_validation: bool = False) -> Dataset:
    """Load, split (stratified for classes, seeded) and preprocess (fitted on train only;
    with ``fit_on_validation`` on train + validation, for a final model trained on both:
    its categories and scales then cover every row it learns from).

    A bundled dataset is read straight into arrays, without pandas (a third of a second
    of every run's start): its columns are all numeric and complete, and it is split and
    scaled exactly as the same frame would be (a test compares the two)."""
    from automl.bundled import FEATURES

    arrays = _bundled_values(spec)
    if arrays is not None:
        assert spec.dataset is not None
        name = spec.dataset
        values, target = arrays
        columns = FEATURES[name]
        image_shape = _bundled_image_shape(name)
        if spec.drop:  # a dropped pixel leaves a table, not an image
            kept = bundled_columns(name, spec.drop)
            values, columns, image_shape = values[:, kept], [columns[i] for i in kept], None
        task: Task = spec.task if spec.task != "auto" else BUNDLED_DATASETS[name]
        labels = target.astype(str) if task == "classification" else None
        target_name: str | None = "target"
    else:
        name, features, series, image_shape = load_frame(spec)
        task = (
            spec.task
            if spec.task != "auto"
            else (BUNDLED_DATASETS[spec.dataset] if spec.dataset else infer_task(series))
        )
        source = spec.path or name  # errors name the file, as the user wrote it
        series = _regression_target(source, series, task)
        _check_target_spread(source, series, task)
        labels = series.astype(str).to_numpy() if task == "classification" else None
        target = series.to_numpy()
        target_name = str(series.name) if series.name is not None else None
    train_idx, val_idx, test_idx = _split(spec.path or name, len(target), spec, seed, labels)
    fit_idx = np.sort(np.concatenate([train_idx, val_idx])) if fit_on_validation else train_idx
    pre = Preprocessor(target=target_name, task=task, header=spec.header)
    pre.image_shape = image_shape
    if arrays is not None:
        X = pre.fit_values(columns, values[fit_idx]).scale_values(values)
        X = X.astype(np.float32)
    else:
        try:
            pre.fit(features.iloc[fit_idx])
        except DataError as exc:  # the columns' errors name the file, as the others do
            raise DataError(f"{spec.path or name}: {exc}") from None
        X = pre.transform(features)
    if task == "classification":
        distinct = _factorize(target)[1]
        pre.classes = sorted({_label_key(v) for v in distinct}, key=lambda v: (str(type(v)), v))
    else:
        y_train = target[fit_idx].astype(np.float64)
        pre.y_mean = float(y_train.mean())
        std = float(y_train.std())
        # A target on a tiny scale (1e-12 units) is scaled like any other; only a
        # training split whose values are all equal keeps a scale of 1.
        pre.y_std = std if std > 0 else 1.0
    if image_shape is not None and X.shape[1] != int(np.prod(image_shape)):
        raise DataError(f"{name}: image inputs cannot have text columns")
    y = pre.encode_target(target)
    return Dataset(
        name=name,
        task=task,
        preprocessor=pre,
        X_train=X[train_idx],
        y_train=y[train_idx],
        X_val=X[val_idx],
        y_val=y[val_idx],
        X_test=X[test_idx],
        y_test=y[test_idx],
    )


def bundled_columns(name: str, drop: Sequence[str]) -> list[int]:
    """The feature columns of bundled dataset ``name`` kept once ``drop`` is dropped."""
    from automl.bundled import FEATURES

    columns = FEATURES[name]
    unknown = [c for c in drop if c not in columns]
    if unknown:
        shown = ", ".join(columns[:8]) + (", ..." if len(columns) > 8 else "")
        raise DataError(
            f"{name}: data.drop names unknown column(s) {', '.join(unknown)} (its columns: {shown})"
        )
    kept = [i for i, c in enumerate(columns) if c not in drop]
    if not kept:
        raise DataError(f"{name}: data.drop leaves no feature columns")
    return kept


def _bundled_values(spec: DataSpec) -> tuple[np.ndarray, np.ndarray] | None:
    """A bundled dataset's feature and target arrays; None for a file, or where the
    bundled files are not as expected (then the frame path reads them)."""
    from automl.bundled import bundled_arrays

    return bundled_arrays(spec.dataset) if spec.dataset is not None else None


def _regression_target(name: str, target: pd.Series, task: Task) -> pd.Series:
    """A regression target as numbers (text that reads as numbers is converted)."""
    import pandas as pd

    if task != "regression" or pd.api.types.is_numeric_dtype(target):
        return target
    converted = pd.to_numeric(target, errors="coerce")
    if converted.isna().any():
        raise DataError(
            f"{name}: task is regression but the target has non-numeric values; "
            "use task: classification"
        )
    return converted


def _check_target_spread(name: str, target: pd.Series, task: Task) -> None:
    """A regression target with one value has nothing to learn, and one beyond
    LARGEST_VALUE cannot be standardised: both refused."""
    if task != "regression":
        return
    distinct = int(target.nunique())
    if distinct == 1:
        raise DataError(
            f"{name}: the target '{target.name}' has a single value ({target.iloc[0]}); "
            "there is nothing to learn"
        )
    values = target.to_numpy(dtype=np.float64, na_value=np.nan)
    with np.errstate(invalid="ignore"):
        big = float(np.nanmax(np.abs(values))) if values.size else 0.0
    if big > LARGEST_VALUE:
        raise DataError(
            f"{name}: the target '{target.name}' holds values up to {big:.3g}, too large to "
            "scale; rescale it (a log, or a division by a power of ten)"
        )


def _split(
    name: str, n: int, spec: DataSpec, seed: int, labels: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train, validation and test row indices: seeded, stratified by the class ``labels``
    (as strings; None for regression) wherever every class can be split."""
    n_test = math.floor(n * spec.test) if spec.test > 0 else 0
    n_val = math.floor(n * spec.validation)
    if n_val < 1:
        raise DataError(
            f"{name}: {n} rows leave no validation row at data.validation={spec.validation}; "
            "give more rows or a larger data.validation"
        )
    n_train = n - n_val - n_test
    if n_train < 2:
        raise DataError(
            f"{name}: {n} rows leave {n_train} training row(s) at data.validation="
            f"{spec.validation} and data.test={spec.test}; give more rows or smaller fractions"
        )
    stratify = None
    if labels is not None:
        classes, counts = np.unique(labels, return_counts=True)
        if len(classes) < 2:
            raise DataError(
                f"{name}: the target has a single class ({classes[0]!r}); "
                "classification needs at least two"
            )
        k = len(classes)
        nearly_one_a_row = k > max(20, n // 2)  # task: classification on measurements?
        if n_train < k:
            fix = (
                "nearly a class a row: is it task: regression?"
                if nearly_one_a_row
                else "lower them"
            )
            raise DataError(
                f"{name}: the training split keeps {n_train} row(s) for {k} classes at "
                f"data.validation={spec.validation} and data.test={spec.test}; {fix}"
            )
        if nearly_one_a_row:
            log.warning(
                "%s: the target has %d classes over %d rows, nearly one a row: did you mean "
                "task: regression?",
                name,
                k,
                n,
            )
        if counts.min() >= 2 and n_val >= k and (n_test == 0 or n_test >= k):
            stratify = labels
    indices = np.arange(n)
    rng_seed = int(seed) % (2**32)
    try:
        rest, test_idx = (
            train_test_split(indices, n_test, rng_seed, stratify)
            if n_test
            else (indices, indices[:0])
        )
        strat_rest = stratify[rest] if stratify is not None else None
        if strat_rest is not None and min(np.unique(strat_rest, return_counts=True)[1]) < 2:
            strat_rest = None
        train_idx, val_idx = train_test_split(rest, n_val, rng_seed, strat_rest)
    except ValueError as exc:
        raise DataError(
            f"{name}: cannot split the data: {exc}; check data.validation and data.test"
        ) from None
    return train_idx, val_idx, test_idx


def to_device(
    dataset: Dataset, device: str, *, model: str = "mlp", include_val_in_train: bool = False
) -> DeviceData:
    """Move the splits to ``device`` once; a CNN gets image-shaped tensors."""
    import torch

    if model == "cnn" and dataset.preprocessor.image_shape is None:
        raise DataError(
            f"{dataset.name}: cnn needs image-shaped input, but X is a table of "
            f"{dataset.n_features} features; use model: mlp, or save X as NxHxW or NxCxHxW"
        )
    shape = dataset.input_shape if model == "cnn" else (dataset.n_features,)
    X_train, y_train = dataset.X_train, dataset.y_train
    if include_val_in_train:
        X_train = np.concatenate([X_train, dataset.X_val])
        y_train = np.concatenate([y_train, dataset.y_val])

    def tensor(a: np.ndarray, target: bool) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(a))
        if not target:
            t = t.reshape((a.shape[0], *shape))
        return t.to(device)

    return DeviceData(
        X_train=tensor(X_train, False),
        y_train=tensor(y_train, True),
        X_val=tensor(dataset.X_val, False),
        y_val=tensor(dataset.y_val, True),
        task=dataset.task,
        n_outputs=dataset.n_outputs,
        input_shape=shape,
        y_std=dataset.preprocessor.y_std,
    )


def resolve_device(requested: str = "auto") -> str:
    """``auto`` picks cuda, then mps, then cpu; a device that does not exist is an error."""
    import torch

    from automl.errors import DeviceError

    if requested == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return "mps"
        return "cpu"
    if requested == "cpu":
        return "cpu"
    if requested == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise DeviceError("device 'mps' is not available here; use --device cpu or auto")
        return "mps"
    if requested == "cuda" or requested.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise DeviceError(
                f"device '{requested}' is not available: no CUDA GPU here; use --device cpu or auto"
            )
        if ":" in requested:
            index = requested.split(":", 1)[1]
            if not index.isdigit() or int(index) >= torch.cuda.device_count():
                raise DeviceError(
                    f"device '{requested}' does not exist: this machine has "
                    f"{torch.cuda.device_count()} CUDA device(s)"
                )
        return requested
    raise DeviceError(f"unknown device '{requested}'; use auto, cpu, cuda, cuda:N or mps")
