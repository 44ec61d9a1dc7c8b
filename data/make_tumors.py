"""Make data/tumors.csv, the CSV example, from scikit-learn's breast cancer dataset.

It is the Wisconsin diagnostic data (569 tumours, 30 measurements) dressed up as a file
a user might have: a string label column (``diagnosis``: malignant / benign, scikit-learn's
own target names), an id column to drop, a categorical column (``size_group``, the mean
radius cut into thirds), about 3% missing values in five measurement columns, and six
rows whose diagnosis is missing (automl drops them with a warning). Seeded: running it
again writes the same file.

    .venv/bin/python data/make_tumors.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.datasets import load_breast_cancer

OUT = Path(__file__).with_name("tumors.csv")


def make_frame(seed: int = 0) -> pd.DataFrame:
    bunch = load_breast_cancer(as_frame=True)
    rng = np.random.default_rng(seed)
    features = bunch.data.round(4)
    features.columns = [c.replace(" ", "_") for c in features.columns]
    frame = pd.DataFrame({"patient_id": [f"P{1000 + i}" for i in range(len(features))]})
    frame["size_group"] = pd.qcut(
        features["mean_radius"], 3, labels=["small", "medium", "large"]
    ).astype(str)
    frame = pd.concat([frame, features], axis=1)
    for col in ("mean_texture", "mean_smoothness", "worst_area", "radius_error", "size_group"):
        holes = rng.random(len(frame)) < 0.03
        frame.loc[holes, col] = np.nan
    frame["diagnosis"] = np.asarray(bunch.target_names)[bunch.target.to_numpy()]
    frame.loc[rng.choice(len(frame), size=6, replace=False), "diagnosis"] = np.nan
    return frame


if __name__ == "__main__":
    frame = make_frame()
    frame.to_csv(OUT, index=False)
    print(f"wrote {OUT} ({len(frame)} rows, {frame.shape[1]} columns)")
