"""Search quality: each example space against scikit-learn's defaults on the same split.

For every example in search_spaces/ it runs a fresh study for a wall-clock budget, then
fits scikit-learn's default MLPClassifier/MLPRegressor and HistGradientBoosting* on the
identical split (``automl.data.load_dataset`` with the study's seed) and scores them on
the same validation rows with the same metric. Prints a Markdown table.

    .venv/bin/python bench/quality.py                    # every example, 100 s each
    .venv/bin/python bench/quality.py --budget 30 iris   # one example, shorter
    .venv/bin/python bench/quality.py --baselines-only   # just the scikit-learn columns
"""

from __future__ import annotations

import argparse
import logging
import math
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from automl.data import Dataset, load_dataset  # noqa: E402
from automl.spaces import METRICS, Space, load_space  # noqa: E402

EXAMPLES = (
    "iris",
    "wine",
    "breast_cancer",
    "diabetes",
    "digits_mlp",
    "digits_cnn",
    "digits_pareto",
    "tumors_csv",
)


def score(metric: str, dataset: Dataset, predicted: np.ndarray) -> float:
    """``metric`` of ``predicted`` (encoded labels or standardized targets) on val."""
    from sklearn import metrics as m

    y = dataset.y_val
    if metric == "val_accuracy":
        return float(m.accuracy_score(y, predicted))
    if metric == "val_balanced_accuracy":
        return float(m.balanced_accuracy_score(y, predicted))
    if metric == "val_f1":
        return float(m.f1_score(y, predicted, average="macro"))
    std = dataset.preprocessor.y_std
    if metric == "val_r2":
        return float(m.r2_score(y, predicted))
    if metric == "val_rmse":
        return float(math.sqrt(m.mean_squared_error(y, predicted)) * std)
    if metric == "val_mae":
        return float(m.mean_absolute_error(y, predicted) * std)
    raise ValueError(f"no scikit-learn score for {metric}")


def quality_metric(space: Space) -> str:
    """The metric the table compares: the first per-epoch validation metric."""
    return next(o for o in space.objectives if o.startswith("val_") and o != "val_loss")


def baselines(space: Space, metric: str) -> dict[str, float]:
    from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
    from sklearn.neural_network import MLPClassifier, MLPRegressor

    dataset = load_dataset(space.data, seed=space.study.seed or 0)
    if dataset.task == "classification":
        models: dict[str, Any] = {
            "mlp": MLPClassifier(random_state=0),
            "hgb": HistGradientBoostingClassifier(random_state=0),
        }
    else:
        models = {
            "mlp": MLPRegressor(random_state=0),
            "hgb": HistGradientBoostingRegressor(random_state=0),
        }
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # MLP's ConvergenceWarning at the default max_iter
        for name, model in models.items():
            model.fit(dataset.X_train, dataset.y_train)
            out[name] = score(metric, dataset, model.predict(dataset.X_val))
    return out


def search(space: Space, metric: str, budget: float, workdir: Path) -> dict[str, Any]:
    from automl.studies import RunOptions, load_study, run_study

    name = Path(space.path or "x").stem
    url = f"sqlite:///{workdir / (name + '.db')}"
    cpu0 = _cpu_seconds()
    t0 = time.perf_counter()
    summary = run_study(
        space, RunOptions(study_name=name, storage_url=url, timeout=budget, device="cpu")
    )
    wall = time.perf_counter() - t0
    cpu = _cpu_seconds() - cpu0
    study = load_study(name, url)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    sign = 1 if METRICS[metric][0] == "maximize" else -1
    best = max(
        (t for t in complete if metric in t.user_attrs),
        key=lambda t: sign * t.user_attrs[metric],
    )
    return {
        "best": float(best.user_attrs[metric]),
        "trials": summary.n_run,
        "pruned": summary.n_pruned,
        "wall": wall,
        "cpu": cpu,
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", nargs="*", default=list(EXAMPLES))
    parser.add_argument("--budget", type=float, default=100.0, help="seconds of search each")
    parser.add_argument("--baselines-only", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    print(
        "| example | metric | automl best | trials (pruned) | wall s | CPU s "
        "| MLP default | HistGB default | beats both |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for example in args.examples:
            space = load_space(ROOT / "search_spaces" / f"{example}.yaml")
            metric = quality_metric(space)
            base = baselines(space, metric)
            sign = 1 if METRICS[metric][0] == "maximize" else -1
            if args.baselines_only:
                row = ["-", "-", "-", "-"]
                verdict = "-"
            else:
                found = search(space, metric, args.budget, Path(tmp))
                row = [
                    f"{found['best']:.4f}",
                    f"{found['trials']} ({found['pruned']})",
                    f"{found['wall']:.0f}",
                    f"{found['cpu']:.0f}",
                ]
                wins = [sign * found["best"] > sign * v for v in base.values()]
                ties = [sign * found["best"] >= sign * v for v in base.values()]
                verdict = "yes" if all(wins) else ("tie" if all(ties) else "no")
            print(
                f"| {example} | {metric} | {' | '.join(row)} | {base['mlp']:.4f} "
                f"| {base['hgb']:.4f} | {verdict} |",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
