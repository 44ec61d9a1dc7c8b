"""Files the user names with ``-o``: never one that a study lives on.

``retrain -o``, ``report -o``, ``export -o`` and ``predict -o`` write a new file; pointed
by mistake at the storage, the data file, the space file or a trial's weights, they
would replace the user's study or data with a model, a page or a table. Each is checked
against those files before any work, by the path it resolves to (``nosuch/../data.csv``
is ``data.csv`` even before ``nosuch`` exists) and, where both exist, by identity (a hard
link or a symlink)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

from automl.errors import UsageError

if TYPE_CHECKING:
    import optuna

# SQLite's own files beside the database: writing over one corrupts the database.
SQLITE_SIDECARS = ("-wal", "-shm", "-journal")


def study_files(study: optuna.Study, storage_url: str | None) -> list[tuple[Path, str]]:
    """(path, what it is) for every file the study lives on or was made from."""
    from automl.storage import _journal_path, _sqlite_path, resolve_storage_url

    url = resolve_storage_url(storage_url)
    files: list[tuple[Path, str]] = []
    database = _sqlite_path(url)
    if database is not None:
        files.append((database, "the study's SQLite storage"))
        files += [(Path(f"{database}{s}"), "a file of the SQLite storage") for s in SQLITE_SIDECARS]
    journal = _journal_path(url)
    if journal is not None:
        files.append((Path(journal), "the study's journal storage"))
        files.append((Path(f"{journal}.lock"), "the journal storage's lock file"))
    attrs = study.user_attrs
    if attrs.get("data_path"):
        files.append((Path(attrs["data_path"]), "the study's data file"))
    if attrs.get("space_file"):
        files.append((Path(attrs["space_file"]), "the study's space file"))
    try:  # the other studies of the storage: their data and space files too
        others = [s for s in study._storage.get_all_studies() if s.study_name != study.study_name]
    except Exception:  # (a storage that cannot list them: this study's files are enough)
        others = []
    for other in others:
        for key, what in (("data_path", "data file"), ("space_file", "space file")):
            if other.user_attrs.get(key):
                files.append(
                    (Path(other.user_attrs[key]), f"the {what} of study '{other.study_name}'")
                )
    for trial in study.get_trials(deepcopy=False):
        weights = trial.user_attrs.get("weights_path")
        if weights:
            files.append((Path(weights), f"the weights trial #{trial.number} kept"))
    return files


def refuse_overwrite(output: Path, files: Iterable[tuple[Path, str]]) -> None:
    """A UsageError (nothing written) when ``output`` is one of ``files``."""
    target = os.path.realpath(output)
    exists = output.exists()
    for path, what in files:
        same = os.path.realpath(path) == target
        if not same and exists and path.exists():
            try:
                same = os.path.samefile(output, path)
            except OSError:
                same = False
        if same:
            raise UsageError(f"-o {output}: is {what} ({path}); write to another file")
