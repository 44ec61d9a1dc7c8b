"""Bad input: every case ends in exit 2 (1 for an unreachable server), one ``error:`` line
naming the problem, no traceback, and a storage that is exactly as it was."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from automl.cli import app

runner = CliRunner()

BASE: dict[str, Any] = {
    "name": "bad",
    "data": {"dataset": "iris", "validation": 0.3},
    "train": {"epochs": 1, "patience": 0},
    "objective": "val_accuracy",
    "study": {"sampler": "random", "pruner": "none", "seed": 0},
    "space": {"optimizer": {"adam": {"lr": {"low": 1e-3, "high": 1e-1, "log": True}}}},
}


def space(**sections: Any) -> str:
    """The base space with whole sections replaced (``None`` removes one)."""
    doc = {k: v for k, v in BASE.items() if k not in sections}
    doc.update({k: v for k, v in sections.items() if v is not None})
    return yaml.safe_dump(doc, sort_keys=False)


def with_space(**params: Any) -> str:
    return space(space={**BASE["space"], **params})


def csv_rows(n: int, label: Any = lambda i: i % 2) -> str:
    return "a,b,y\n" + "".join(f"{i},{(i * 7) % 5},{label(i)}\n" for i in range(n))


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    fragment: str
    files: dict[str, str | bytes] = field(default_factory=dict)
    code: int = 2
    storage: bool = True  # add --storage pointing at a populated copy


def run_space(name: str, text: str, fragment: str, *extra: str) -> Case:
    """`automl run FILE` on a space file holding ``text``."""
    return Case(
        f"space-{name}",
        ("run", f"{name}.yaml", "--n-trials", "1", *extra),
        fragment,
        {f"{name}.yaml": text},
    )


def run_data(name: str, file: str, content: str | bytes | None, fragment: str, *extra: str) -> Case:
    """`automl run --data FILE --target y` on a data file holding ``content``."""
    files = {} if content is None else {file: content}
    args = ("run", "--data", file, "--target", "y", "--epochs", "1", "--n-trials", "1", *extra)
    return Case(f"data-{name}", args, fragment, files)


def _npz(**arrays: Any) -> bytes:
    import io

    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


GOOD = space()
CORPUS: list[Case] = [
    # ---- space files: YAML itself
    run_space("tabs", "data:\n\tdataset: iris\n", "tabs are not allowed"),
    run_space(
        "step-does-not-divide",
        "data: {dataset: iris}\nspace:\n  hidden_units: {low: 8, high: 30, step: 7}\n",
        "space.hidden_units: step 7 does not divide 8..30; use high: 29 or 36",
    ),
    run_space(
        "objective-of-another-task",
        "data: {dataset: diabetes}\nobjective: val_accuracy\n",
        "is a classification metric but the task is regression; use one of val_loss, val_rmse",
    ),
    run_space(
        "optimizer-param-set-twice",
        "data: {dataset: iris}\nspace:\n  optimizer: {adam: {lr: 0.01}}\n  lr: 0.1\n",
        "space.lr: unused: every optimizer that takes 'lr' (adam) sets its own",
    ),
    run_space(
        "cmaes-several-objectives",
        "data: {dataset: iris}\nobjective: [val_accuracy, n_params]\nstudy: {sampler: cmaes}\n",
        "study.sampler: cmaes optimizes one objective; with several use nsga2",
    ),
    run_space(
        "duplicate-key",
        "data: {dataset: iris}\nspace:\n  batch_size: [16, 32]\n  batch_size: 64\n",
        "line 4, column 3: invalid YAML: 'batch_size' is given twice in one mapping; keep one",
    ),
    run_space("unclosed", "data: {dataset: iris\nspace: {lr: [1, 2\n", "invalid YAML"),
    run_space("empty", "", "the file is empty"),
    run_space("comments-only", "# nothing here\n", "the file is empty"),
    run_space("list-top", "- data\n- space\n", "expected a mapping of sections"),
    run_space("scalar-top", "just a string\n", "expected a mapping of sections"),
    run_space(
        "python-tag",
        "data: !!python/object/apply:os.system ['echo pwned']\n",
        "could not determine a constructor",
    ),
    Case("space-missing-file", ("run", "nowhere.yaml"), "nowhere.yaml: no such file"),
    Case("space-is-a-folder", ("run", "."), "cannot read the space file"),
    Case(
        "space-not-utf8",
        ("run", "latin.yaml"),
        "cannot read the space file",
        {"latin.yaml": GOOD.encode() + "name: d\xe9j\xe0\n".encode("latin-1")},
    ),
    # ---- space files: unknown names, with a suggestion
    run_space("unknown-section", GOOD + "spaec: {}\n", "did you mean 'space'?"),
    run_space("unknown-name", with_space(hiden_units=16), "did you mean 'hidden_units'?"),
    run_space(
        "unknown-data-key",
        space(data={"datset": "iris"}),
        "data.datset: unknown key, expected one of",
    ),
    run_space(
        "unknown-range-key",
        with_space(dropout={"low": 0.0, "hihg": 0.5}),
        "did you mean 'high'?",
    ),
    run_space("unknown-optimizer", with_space(optimizer="adamm"), "did you mean 'adam'?"),
    run_space("unknown-loss", with_space(loss="crossentropy"), "did you mean 'cross_entropy'?"),
    run_space("unknown-activation", with_space(activation="rellu"), "did you mean 'relu'?"),
    run_space("unknown-sampler", space(study={"sampler": "tpee"}), "did you mean 'tpe'?"),
    run_space("unknown-pruner", space(study={"pruner": "medain"}), "did you mean 'median'?"),
    run_space("unknown-metric", space(objective="val_acuracy"), "did you mean 'val_accuracy'?"),
    run_space("unknown-dataset", space(data={"dataset": "irs"}), "did you mean 'iris'?"),
    run_space("unknown-model", space(model="cnnn"), "did you mean 'cnn'?"),
    # ---- space files: types and ranges
    run_space("wrong-type-epochs", space(train={"epochs": "many"}), "train.epochs"),
    run_space(
        "wrong-type-bound",
        with_space(dropout={"low": "none", "high": 0.5}),
        "space.dropout.low: must be a number",
    ),
    run_space("wrong-type-section", space(train=[1, 2]), "train: expected a mapping"),
    run_space(
        "low-above-high",
        with_space(dropout={"low": 0.6, "high": 0.5}),
        "low must be <= high, got low=0.6 high=0.5",
    ),
    run_space(
        "log-low-zero",
        with_space(weight_decay={"low": 0.0, "high": 0.1, "log": True}),
        "log: true needs low > 0",
    ),
    run_space(
        "log-low-negative",
        with_space(hidden_units={"low": -4, "high": 64, "log": True}),
        "space.hidden_units",
    ),
    run_space("empty-choices", with_space(batch_size=[]), "an empty choice list"),
    run_space("empty-optimizers", with_space(optimizer=[]), "an empty choice list"),
    run_space("batch-size-zero", with_space(batch_size=[0, 16]), "space.batch_size: must be"),
    run_space("units-negative", with_space(hidden_units=-4), "space.hidden_units: must be"),
    run_space("layers-zero", with_space(n_layers={"low": 0, "high": 2}), "space.n_layers.low"),
    run_space("epochs-zero", space(train={"epochs": 0}), "train.epochs"),
    run_space("dropout-one", with_space(dropout=1.0), "space.dropout: must be"),
    run_space(
        "validation-above-one", space(data={"dataset": "iris", "validation": 1.5}), "validation"
    ),
    run_space("validation-zero", space(data={"dataset": "iris", "validation": 0}), "validation"),
    run_space(
        "bundled-with-target",
        space(data={"dataset": "iris", "target": "species"}),
        "the bundled dataset 'iris' has its own target",
    ),
    run_space(
        "bundled-with-header",
        space(data={"dataset": "iris", "header": False}),
        "the bundled dataset 'iris' has its names: remove 'header'",
    ),
    run_space(
        "bundled-drop-unknown",
        space(data={"dataset": "iris", "drop": ["petal_width"]}),
        "iris: data.drop names unknown column(s) petal_width (its columns: sepal length",
    ),
    run_space(
        "bundled-drop-everything",
        space(
            data={
                "dataset": "iris",
                "drop": [
                    "sepal length (cm)",
                    "sepal width (cm)",
                    "petal length (cm)",
                    "petal width (cm)",
                ],
            }
        ),
        "iris: data.drop leaves no feature columns",
    ),
    run_space(
        "fractions-sum-to-one",
        space(data={"dataset": "iris", "validation": 0.6, "test": 0.4}),
        "validation + test must be < 1",
    ),
    run_space(
        "param-optimizer-does-not-take",
        with_space(optimizer={"adam": {"momentum": 0.9}}),
        "optimizer 'adam' does not take 'momentum'",
    ),
    run_space(
        "param-no-chosen-optimizer-takes",
        with_space(nesterov=[True, False]),
        "no chosen optimizer (adam) takes 'nesterov'",
    ),
    run_space(
        "grid-continuous",
        space(
            study={"sampler": "grid"},
            space={"optimizer": "adam", "dropout": {"low": 0.0, "high": 0.5}},
        ),
        "the grid sampler needs categorical or stepped parameters",
    ),
    run_space(
        "loss-for-regression",
        space(data={"dataset": "diabetes"}, objective="val_rmse", space={"loss": "cross_entropy"}),
        "'cross_entropy' does not fit a regression task",
    ),
    run_space(
        "metric-for-regression",
        space(data={"dataset": "diabetes"}),
        "'val_accuracy' is a classification metric",
    ),
    run_space("bce-three-classes", with_space(loss="bce"), "'bce' needs exactly 2 classes"),
    run_space("cnn-on-tabular", space(model="cnn"), "cnn needs image-shaped input"),
    run_space(
        "sampler-bad-option",
        space(study={"sampler": {"name": "tpe", "n_startup": 3}}),
        "did you mean 'n_startup_trials'?",
    ),
    # ---- flags that build or change the space
    Case(
        "flag-bad-range", ("run", "--dataset", "iris", "--lr", "1e-3..x"), "a range needs numbers"
    ),
    Case(
        "flag-range-reversed",
        ("run", "--dataset", "iris", "--lr", "1e-1..1e-5:log"),
        "low must be <= high",
    ),
    Case("flag-bad-modifier", ("run", "--dataset", "iris", "--lr", "1..2:lg"), "unknown modifier"),
    Case(
        "flag-unknown-param",
        ("run", "--dataset", "iris", "--param", "hiden_units=8"),
        "did you mean 'hidden_units'?",
    ),
    Case(
        "flag-param-of-an-optimizer-not-searched",
        ("run", "--dataset", "iris", "--optimizer", "adam", "--param", "sgd.momentum=0.9"),
        "sgd is not among the optimizers searched (adam); add it (--optimizer adam,sgd)",
    ),
    Case(
        "flag-param-of-a-loss-not-searched",
        ("run", "--dataset", "diabetes", "--loss", "mse", "--param", "huber.delta=2"),
        "huber is not among the losses searched (mse); add it (--loss mse,huber)",
    ),
    Case("flag-study-empty", ("run", "--dataset", "iris", "--study", ""), "a study name needs"),
    Case("flag-study-blank", ("run", "--dataset", "iris", "--study", " x"), "none at its ends"),
    Case("flag-param-no-equals", ("run", "--dataset", "iris", "--param", "dropout"), "NAME=SPEC"),
    Case("flag-no-space", ("run",), "give a space file"),
    # ---- data files
    run_data("missing-file", "gone.csv", None, "gone.csv: no such data file"),
    run_data("not-text", "blob.csv", b"\xff\xfe\x00garbage\x00\x81", "cannot read the data file"),
    Case("data-is-folder", ("run", "--data", ".", "--target", "y"), "is a folder"),
    run_data("unsupported-type", "table.xlsx", "a,y\n1,0\n", "unsupported file type"),
    run_data(
        "not-utf8", "latin.csv", "a,y\nd\xe9j\xe0,0\n".encode("latin-1") * 20, "save it as UTF-8"
    ),
    run_data(
        "ragged-rows",
        "ragged.csv",
        "a,b,y\n1,2,0\n1,2,3,4,5\n" * 10,
        "Expected 3 fields in line 3, saw 5; every row needs as many fields as the header",
    ),
    run_data(
        "unclosed-quote",
        "quote.csv",
        'a,b,y\n1,2,0\n"3,4,1\n5,6,0\n',
        'a quote (") is opened and never closed',
    ),
    run_data(
        "bad-parquet", "t.parquet", b"PAR1 not really parquet PAR1", "cannot read the data file"
    ),
    Case(
        "data-npz-with-pickled-objects",
        ("run", "--data", "objects.npz", "--epochs", "1"),
        "not Python objects; save text labels with y.astype(str)",
        {"objects.npz": _npz(X=np.array([{"a": 1}] * 10, dtype=object), y=np.arange(10) % 2)},
    ),
    Case(
        "data-npz-one-hot-y",
        ("run", "--data", "onehot.npz", "--epochs", "1"),
        "y must hold one value per row, got shape (10, 2); for one-hot labels save y.argmax",
        {"onehot.npz": _npz(X=np.ones((10, 3)), y=np.eye(2)[np.arange(10) % 2])},
    ),
    Case(
        "data-npz-complex-x",
        ("run", "--data", "complex.npz", "--epochs", "1"),
        "X must be real numbers, got dtype complex128",
        {"complex.npz": _npz(X=np.ones((10, 3)) * 1j, y=np.arange(10) % 2)},
    ),
    run_data("npz-not-an-archive", "junk.npz", b"garbage" * 50, "not an NPZ archive of arrays"),
    run_data(
        "duplicate-column",
        "dup.csv",
        "a,b,a,y\n" + "1,2,3,0\n4,5,6,1\n" * 15,
        "dup.csv: the header names column 'a' 2 times; give every column its own name",
    ),
    run_data(
        "duplicate-after-strip",
        "dup2.csv",
        "a,a ,y\n" + "1,3,0\n4,6,1\n" * 15,
        "the header names column 'a' 2 times",
    ),
    run_data("parquet-named-csv", "t.csv", b"PAR1" + b"\x00" * 40, "is a Parquet file, not CSV"),
    run_data("excel-named-csv", "t.csv", b"PK\x03\x04" + b"\x00" * 40, "save the sheet as CSV"),
    run_data("empty-csv", "empty.csv", "", "the file is empty"),
    run_data("header-only", "header.csv", "a,b,y\n", "has a header but no rows"),
    run_data("target-missing", "t.csv", csv_rows(30).replace(",y\n", ",yy\n", 1), "'y' is not"),
    Case(
        "data-target-wrong-case",
        ("run", "--data", "cars.csv", "--target", "mpg", "--epochs", "1"),
        "did you mean 'MPG'?",
        {"cars.csv": "Name,MPG,Cylinders\n" + "".join(f"c{i},{i},4\n" for i in range(30))},
    ),
    run_data("target-empty", "t.csv", "a,b,y\n1,2,\n3,4,\n5,6,\n", "entirely empty"),
    run_data("single-class", "one.csv", csv_rows(30, lambda i: "x"), "a single class"),
    run_data("too-few-rows", "few.csv", csv_rows(2), "leave no validation row"),
    Case(
        "data-constant-regression-target",
        ("run", "c.yaml"),
        "the target 'y' has a single value (5000.0); there is nothing to learn",
        {
            "c.csv": "a,y\n" + "".join(f"{i},5000.0\n" for i in range(30)),
            "c.yaml": "data: {path: c.csv, target: y, task: regression}\n",
        },
    ),
    Case(
        "data-classes-nearly-one-a-row",
        ("run", "c.yaml"),
        "nearly a class a row: is it task: regression?",
        {
            "c.csv": "a,y\n" + "".join(f"{i},{i * 1.37:.2f}\n" for i in range(30)),
            "c.yaml": "data: {path: c.csv, target: y, task: classification}\n",
        },
    ),
    run_space(
        "validation-leaves-too-few-training-rows",
        "data: {dataset: iris, validation: 0.99}\n",
        "the training split keeps 2 row(s) for 3 classes at data.validation=0.99",
    ),
    run_data(
        "feature-cannot-be-encoded",
        "wide.csv",
        "a,b,y\n" + "".join(f"{i},text{i},{i % 2}\n" for i in range(1400)),
        "cannot be one-hot encoded",
    ),
    Case(
        "data-regression-text-target",
        ("run", "r.yaml"),
        "non-numeric",
        {
            "r.csv": csv_rows(30, lambda i: "unknown" if i % 3 == 0 else i * 1.5),
            "r.yaml": space(
                data={"path": "r.csv", "target": "y", "task": "regression"},
                objective="val_rmse",
                space={"loss": "mse"},
            ),
        },
    ),
    Case(
        "data-npz-without-x",
        ("run", "--data", "arrays.npz", "--epochs", "1"),
        "needs an array named X",
        {"arrays.npz": _npz(features=np.zeros((10, 2)), y=np.arange(10) % 2)},
    ),
    Case(
        "data-no-target-named",
        ("run", "--data", "t.csv", "--epochs", "1"),
        "say which column to predict",
        {"t.csv": csv_rows(30).replace(",y\n", ",label\n", 1)},
    ),
    # ---- flags
    Case(
        "negative-n-trials", ("run", "g.yaml", "--n-trials", "-1"), "--n-trials", {"g.yaml": GOOD}
    ),
    Case("zero-until", ("run", "g.yaml", "--until", "0"), "--until", {"g.yaml": GOOD}),
    Case("negative-timeout", ("run", "g.yaml", "--timeout", "-5"), "--timeout", {"g.yaml": GOOD}),
    Case(
        "negative-max-failures",
        ("run", "g.yaml", "--max-failures", "-1"),
        "--max-failures",
        {"g.yaml": GOOD},
    ),
    Case("n-trials-not-a-number", ("run", "g.yaml", "--n-trials", "x"), "--n-trials"),
    Case("zero-epochs-flag", ("run", "g.yaml", "--epochs", "0"), "--epochs", {"g.yaml": GOOD}),
    Case("unknown-option", ("run", "--bogus"), "No such option: --bogus"),
    Case("negative-seed", ("run", "g.yaml", "--seed", "-1"), "--seed", {"g.yaml": GOOD}),
    run_space("negative-seed-in-file", space(study={"seed": -5}), "study.seed"),
    Case(
        "warm-start-unknown-study",
        ("run", "g.yaml", "--warm-start", "nope"),
        "no study named 'nope'",
        {"g.yaml": GOOD},
    ),
    Case(
        "warm-start-malformed",
        ("run", "g.yaml", "--warm-start", "kept:x"),
        "OTHER_STUDY:K",
        {"g.yaml": GOOD},
    ),
    Case("show-bad-state", ("show", "kept", "--state", "bogus"), "--state must be one of"),
    Case("unknown-command", ("bogus",), "No such command 'bogus'"),
    Case("device-cuda-7", ("run", "g.yaml", "--device", "cuda:7"), "cuda:7", {"g.yaml": GOOD}),
    Case(
        "device-tpu", ("run", "g.yaml", "--device", "tpu"), "unknown device 'tpu'", {"g.yaml": GOOD}
    ),
    Case("device-cuda-x", ("run", "g.yaml", "--device", "cuda:x"), "cuda:x", {"g.yaml": GOOD}),
    # ---- studies
    Case("show-unknown-study", ("show", "nope"), "no study named 'nope'"),
    Case("best-unknown-study", ("best", "nope"), "no study named 'nope'"),
    Case("export-unknown-study", ("export", "nope"), "no study named 'nope'"),
    Case("delete-unknown-study", ("delete", "nope", "--yes"), "no study named 'nope'"),
    Case("delete-without-yes", ("delete", "kept"), "add --yes"),
    Case("report-unknown-study", ("report", "nope", "-o", "r.html"), "no study named 'nope'"),
    Case("retrain-unknown-study", ("retrain", "nope", "-o", "m.pt"), "no study named 'nope'"),
    Case("retrain-unknown-trial", ("retrain", "kept", "--trial", "99", "-o", "m.pt"), "#99"),
    Case(
        "predict-missing-model", ("predict", "m.pt", "r.csv"), "no such model file", storage=False
    ),
    Case(
        "predict-model-is-a-folder",
        ("predict", ".", "r.csv"),
        "is a folder, not a model file",
        storage=False,
    ),
    Case("export-bad-format", ("export", "kept", "--format", "xml"), "csv or json"),
    Case("best-unknown-names-others", ("best", "kep"), "studies here: kept"),
    # ---- storage URLs
    Case(
        "url-malformed", ("studies", "--storage", "notaurl"), "malformed storage URL", storage=False
    ),
    Case(
        "url-unknown-dialect",
        ("studies", "--storage", "postgresql+nodriver://u@h/db"),
        "malformed storage URL",
        storage=False,
    ),
    Case(
        "url-misspelt-dialect",
        ("studies", "--storage", "postgres+psycopg://u@h/db"),
        "did you mean postgresql+psycopg://...?",
        storage=False,
    ),
    Case(
        "url-unknown-scheme",
        ("studies", "--storage", "ftp://h/x"),
        "use sqlite:///FILE.db, postgresql+psycopg://user@host/db",
        storage=False,
    ),
    Case(
        "url-in-memory-sqlite",
        ("run", "g.yaml", "--storage", "sqlite://"),
        "is an in-memory database: it keeps nothing after the run",
        {"g.yaml": GOOD},
        storage=False,
    ),
    Case(
        "url-grpc-without-port",
        ("studies", "--storage", "grpc://localhost"),
        "grpc://HOST:PORT",
        storage=False,
    ),
    Case(
        "driver-not-installed",
        ("run", "g.yaml", "--storage", "mssql+pymssql://sa:pw@127.0.0.1/db"),
        "pip install pymssql",
        {"g.yaml": GOOD},
        storage=False,
    ),
    Case(
        "driver-psycopg2-not-installed",
        ("studies", "--storage", "postgresql+psycopg2://postgres@127.0.0.1/postgres"),
        "pip install 'automl[postgres]'",
        storage=False,
    ),
    Case(
        "driver-mysqldb-not-installed",
        ("studies", "--storage", "mysql://root@127.0.0.1/mysql"),
        "pip install 'automl[mysql]'",
        storage=False,
    ),
    Case(
        "server-unreachable",
        ("run", "g.yaml", "--storage", "postgresql+psycopg://postgres@127.0.0.1:1/x"),
        "cannot open the storage",
        {"g.yaml": GOOD},
        code=1,
        storage=False,
    ),
    Case(
        "sqlite-under-a-file",
        ("run", "g.yaml", "--storage", "sqlite:///g.yaml/studies.db"),
        "cannot create the folder",
        {"g.yaml": GOOD},
        storage=False,
    ),
    Case(
        "sqlite-not-a-database",
        ("run", "g.yaml", "--storage", "sqlite:///notdb.db"),
        "not a SQLite database",
        {"g.yaml": GOOD, "notdb.db": b"PK\x03\x04 this is a zip file, not SQLite" * 50},
        storage=False,
    ),
    Case(
        "sqlite-corrupt-pages",
        ("studies", "--storage", "sqlite:///corrupt.db"),
        "not a valid SQLite database",
        {"corrupt.db": b"SQLite format 3\x00" + b"\x00\xff\x13" * 3000},
        storage=False,
    ),
]


# --------------------------------------------------------------------------- the storage


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A SQLite storage holding one study ('kept') with one complete trial."""
    import optuna

    from automl.storage import open_storage

    path = tmp_path_factory.mktemp("populated") / "studies.db"
    storage = open_storage(f"sqlite:///{path}")
    study = optuna.create_study(study_name="kept", storage=storage, direction="maximize")
    dist = optuna.distributions.FloatDistribution(1e-3, 1e-1, log=True)
    study.add_trial(
        optuna.trial.create_trial(params={"lr": 0.01}, distributions={"lr": dist}, value=0.9)
    )
    storage.engine.dispose()  # type: ignore[attr-defined]
    return path


def snapshot(path: Path) -> tuple[int, int, str]:
    """Studies, trials and a full SQL dump: any write at all shows up in the dump."""
    with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as con:
        n_studies = con.execute("SELECT count(*) FROM studies").fetchone()[0]
        n_trials = con.execute("SELECT count(*) FROM trials").fetchone()[0]
        dump = "\n".join(con.iterdump())
    return n_studies, n_trials, dump


def write_files(where: Path, files: dict[str, str | bytes]) -> dict[Path, bytes]:
    written = {}
    for name, content in files.items():
        p = where / name
        data = content.encode() if isinstance(content, str) else content
        p.write_bytes(data)
        written[p] = data
    return written


def assert_one_error_line(result: Any, case: Case) -> str:
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(
        result.exception
    )
    assert result.exit_code == case.code, (result.exit_code, result.output)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert case.fragment in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


@pytest.mark.parametrize("case", CORPUS, ids=[c.id for c in CORPUS])
def test_bad_input(case: Case, tmp_path: Path, populated: Path) -> None:
    files = write_files(tmp_path, case.files)
    args = list(case.args)
    db = tmp_path / "kept.db"
    if case.storage:
        db.write_bytes(populated.read_bytes())
        args += ["--storage", f"sqlite:///{db}"]
        before = snapshot(db)
    result = runner.invoke(app, args)
    assert_one_error_line(result, case)
    if case.storage:
        assert snapshot(db) == before
    for path, data in files.items():  # inputs, corrupt SQLite files included, are untouched
        assert path.read_bytes() == data, f"{path.name} was modified"
    leftovers = {p.name for p in tmp_path.iterdir()} - {p.name for p in files} - {"kept.db"}
    leftovers -= {"kept.db-wal", "kept.db-shm"}
    assert not leftovers, f"a failed command left {leftovers}"


RUN_CASES = [c for c in CORPUS if c.args[0] == "run" and c.storage]


@pytest.mark.parametrize("case", RUN_CASES, ids=[c.id for c in RUN_CASES])
def test_bad_run_creates_no_storage(case: Case, tmp_path: Path) -> None:
    """A run refused for bad input does not even create its (fresh) SQLite file."""
    write_files(tmp_path, case.files)
    fresh = tmp_path / "fresh" / "studies.db"
    result = runner.invoke(app, [*case.args, "--storage", f"sqlite:///{fresh}"])
    assert_one_error_line(result, case)
    assert not fresh.parent.exists()


def test_bad_run_with_default_storage_creates_nothing(tmp_path: Path) -> None:
    """Without --storage the default ./studies/automl.db is not created either."""
    (tmp_path / "s.yaml").write_text(with_space(batch_size=[0]))
    result = runner.invoke(app, ["run", "s.yaml"])
    assert result.exit_code == 2
    assert not (tmp_path / "studies").exists()


def test_corpus_is_big_enough() -> None:
    assert len(CORPUS) >= 25
    assert len({c.id for c in CORPUS}) == len(CORPUS)


def test_a_bad_space_against_an_existing_study_changes_nothing(
    tmp_path: Path, populated: Path
) -> None:
    """The same study name as a stored study, with a broken file: the study keeps its
    trials and attributes."""
    db = tmp_path / "kept.db"
    db.write_bytes(populated.read_bytes())
    (tmp_path / "kept.yaml").write_text(with_space(dropout={"low": 0.9, "high": 0.1}))
    before = snapshot(db)
    result = runner.invoke(
        app, ["run", "kept.yaml", "--study", "kept", "--storage", f"sqlite:///{db}"]
    )
    assert result.exit_code == 2
    assert snapshot(db) == before


def test_space_check_lists_every_problem_one_per_line(tmp_path: Path) -> None:
    (tmp_path / "s.yaml").write_text(
        space(
            data={"dataset": "irs"},
            space={"batch_size": [0], "dropout": {"low": 0.9, "high": 0.1}},
        )
    )
    result = runner.invoke(app, ["space", "check", "s.yaml"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert len(lines) == 3, result.stderr
    assert all(line.startswith("error: s.yaml: ") for line in lines)
    assert any("did you mean 'iris'" in line for line in lines)
    assert "Traceback" not in result.output


def test_markup_in_messages_is_printed_literally(tmp_path: Path) -> None:
    """Messages quote user text; Rich must not eat '[b]' or choke on '[/x]'."""
    (tmp_path / "s.yaml").write_text(with_space(**{"[/x]": 1, "[b]": 2}))
    result = runner.invoke(app, ["run", "s.yaml"])
    assert result.exit_code == 2
    assert "[/x]" in result.stderr
    assert "Traceback" not in result.output
