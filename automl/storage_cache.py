"""A run's view of an RDB storage: Optuna's trial cache, re-read less often.

Optuna wraps an RDBStorage in ``_CachedStorage``, which keeps finished trials in memory
but still queries the database (a trial query plus five relation loads) on *every*
``get_all_trials``: once per ``should_prune`` (10 per trial with 10 epochs), once per
sampling, once per best-trial check. On SQLite those reads were most of the bookkeeping
cost of a trial (BENCHMARKS.md).

``RunStorage`` re-reads at most every ``refresh`` seconds, and at once after this process
changed the set of trials (asked one, finished one), so its own trials are always seen.
What other workers did is seen at most ``refresh`` seconds late: the pruner compares with
their finished trials a moment later, the sampler's constant liar sees their running
trials a moment later; neither needs more.

Reads of this process's own running trials are served from memory: every write to such
a trial goes through this object, so a copy kept in step with those writes is what the
database holds (Optuna otherwise loads the whole trial, five queries, on each of the
five reads a trial makes of itself: ``Trial()``, ``tell`` twice, system attributes).

A trial this process finishes goes into the cache as it is told (its state, values and
end time are what the database now holds), so asking the next trial reads nothing.

Writes: a trial's suggested parameters (and the system attributes of this process's
running trials: TPE's relative parameters) are buffered and written in one transaction
when the configuration is complete (``flush_params``, called by the objective before
training; a pack's trials all in one, ``flush_trials``) or before anything else touches
the trial. User attributes of this process's running trials are buffered too, and
written with the trial's end: its remaining reports, attributes, state and values in one
transaction (``_finish``). Each kind of write is a statement built once and executed over
all its rows. Reports (intermediate values) of this process's own
running trials are buffered too and written in one statement at most every ``refresh``
seconds, before the trial's end is written, before any other write to the trial, and
before a checkpoint is saved (``flush_reports``, so a resumed trial finds every epoch up
to its checkpoint). That loses nothing the pruners need: this process's pruner reads its
own trial from memory, and every Optuna pruner compares with *finished* trials only. The
dashboard sees a running trial's curve at most ``refresh`` seconds late; a process killed
outright loses at most that much of its last trial's curve (the epochs after its last
checkpoint, which the retry trains again anyway).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Container, Sequence
from typing import Any

from optuna.storages import RDBStorage, _CachedStorage
from optuna.trial import TrialState

REFRESH_SECONDS = 1.0


class RunStorage(_CachedStorage):
    """``_CachedStorage`` whose database reads are throttled (see the module docstring)."""

    def __init__(self, backend: RDBStorage, *, refresh: float = REFRESH_SECONDS) -> None:
        super().__init__(backend)
        self.refresh = refresh
        self._last_read: dict[int, float] = {}
        # Parameters suggested but not yet written, per trial: (name, value, dist, previous),
        # and system attributes of its own running trials not yet written.
        self._pending: dict[int, list[tuple[str, float, Any, Any]]] = {}
        self._pending_attrs: dict[int, dict[str, Any]] = {}
        self._pending_user_attrs: dict[int, dict[str, Any]] = {}
        # Statements built once and executed over many rows (see _write_into).
        self._statements: dict[str, Any] = {}
        # This process's running trials, kept in step with its writes to them.
        self._owned: dict[int, Any] = {}
        # Reports of owned trials not yet written: trial id -> {step: value}; and when
        # each trial's reports were last written.
        self._reports: dict[int, dict[int, float]] = {}
        self._reports_written: dict[int, float] = {}
        # get_all_trials' sorted lists, per (study, states), valid while the cache's
        # generation (bumped by every change to its trials) is the one they were made in.
        self._generation = 0
        self._sorted: dict[tuple[int, frozenset[TrialState] | None], tuple[int, list[Any]]] = {}

    def _own(self, trial_id: int) -> Any:
        return self._owned.get(trial_id)

    # ------------------------------------------------------------------ parameters

    def set_trial_param(
        self, trial_id: int, param_name: str, param_value_internal: float, distribution: Any
    ) -> None:
        """Buffer the parameter (checked against the study's distributions now); it is
        written with the trial's other buffered parameters in one transaction by
        ``flush_params``, or before anything else touches this trial."""
        from optuna.distributions import check_distribution_compatibility

        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial_id)
            study = self._studies.get(where[0]) if where is not None else None
        if study is None:
            super().set_trial_param(trial_id, param_name, param_value_internal, distribution)
            return
        previous = study.param_distribution.get(param_name)
        if previous is not None:
            check_distribution_compatibility(previous, distribution)
        pending = self._pending.setdefault(trial_id, [])
        pending.append((param_name, param_value_internal, distribution, previous))
        if previous is None:
            study.param_distribution[param_name] = distribution
        owned = self._own(trial_id)
        if owned is not None:
            owned._params[param_name] = distribution.to_external_repr(param_value_internal)
            owned._distributions[param_name] = distribution

    def flush_params(self, trial_id: int) -> None:
        """Write the trial's buffered parameters and attributes in one transaction."""
        self._write_buffered([trial_id], reports=False)

    def flush_trials(self, trial_ids: Sequence[int]) -> None:
        """Write the buffered parameters and attributes of several trials (a pack's) in
        one transaction."""
        self._write_buffered(trial_ids, reports=False)

    def _buffered(self, trial_id: int, *, reports: bool) -> bool:
        return bool(
            self._pending.get(trial_id)
            or self._pending_attrs.get(trial_id)
            or self._pending_user_attrs.get(trial_id)
            or (reports and self._reports.get(trial_id))
        )

    def _write_buffered(self, trial_ids: Sequence[int], *, reports: bool) -> None:
        """Write what is buffered for the trials (parameters, attributes and, with
        ``reports``, their reports) in one transaction; the buffers are emptied once it
        is committed."""
        from optuna.storages._rdb.storage import _create_scoped_session

        ids = [i for i in trial_ids if self._buffered(i, reports=reports)]
        if not ids:
            return
        written = {}
        with _create_scoped_session(self._backend.scoped_session, True) as session:
            for trial_id in ids:
                self._check_updatable(session, trial_id)
                written[trial_id] = self._write_into(session, trial_id, reports=reports)
        for trial_id, what in written.items():
            self._forget(trial_id, what)

    def _check_updatable(self, session: Any, trial_id: int, *, lock: bool = False) -> None:
        """Optuna's check that a trial exists and has not finished, in one query (with
        ``lock``, its row locked for the transaction where the database can)."""
        import sqlalchemy
        from optuna.storages._rdb import models

        table = models.TrialModel.__table__
        query = sqlalchemy.select(table.c.state).where(table.c.trial_id == trial_id)
        state = session.execute(query.with_for_update() if lock else query).scalar_one_or_none()
        if state is None:
            raise KeyError(models.NOT_FOUND_MSG)
        self._backend.check_trial_is_updatable(trial_id, state)

    def _write_into(self, session: Any, trial_id: int, *, reports: bool) -> dict[str, Any]:
        """Add the trial's buffered writes to ``session`` (not committed): on SQLite and
        PostgreSQL a few cached statements, each executed over all its rows at once (a
        statement built per write was compiled anew every time: most of a trial's
        bookkeeping); elsewhere Optuna's own writes. What was written, for _forget once it
        is committed."""

        import sqlalchemy
        from optuna.distributions import distribution_to_json
        from optuna.storages._rdb import models

        backend = self._backend
        written: dict[str, Any] = {
            "params": list(self._pending.get(trial_id, ())),
            "attrs": dict(self._pending_attrs.get(trial_id, {})),
            "user_attrs": dict(self._pending_user_attrs.get(trial_id, {})),
            "reports": dict(self._reports.get(trial_id, {})) if reports else {},
        }
        self._write_attrs(session, models.TrialSystemAttributeModel, trial_id, written["attrs"])
        self._write_attrs(session, models.TrialUserAttributeModel, trial_id, written["user_attrs"])
        params = []
        for name, value, distribution, previous in written["params"]:
            if previous is None:  # a name new to this process: Optuna checks the study
                backend._set_trial_param_without_commit(
                    session, trial_id, name, value, distribution, previous
                )
                continue
            # Compatibility with ``previous`` was checked when the value was buffered.
            params.append(
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": value,
                    "distribution_json": distribution_to_json(distribution),
                }
            )
        if params:
            session.execute(sqlalchemy.insert(models.TrialParamModel), params)
        if written["reports"]:  # (buffered on SQLite and PostgreSQL only)
            model = models.TrialIntermediateValueModel
            rows = []
            for step, value in sorted(written["reports"].items()):
                stored, kind = model.intermediate_value_to_stored_repr(value)
                rows.append(
                    {
                        "trial_id": trial_id,
                        "step": step,
                        "intermediate_value": stored,
                        "intermediate_value_type": kind,
                    }
                )
            columns = ("intermediate_value", "intermediate_value_type")
            session.execute(self._upsert(model, ("trial_id", "step"), columns), rows)
        return written

    def _upsert(self, model: Any, keys: tuple[str, ...], columns: tuple[str, ...]) -> Any:
        """The cached ``INSERT .. ON CONFLICT (keys) DO UPDATE SET columns`` of ``model``
        (SQLite, PostgreSQL), for executing over many rows."""
        statement = self._statements.get(model.__tablename__)
        if statement is None:
            insert = self._insert(model)
            statement = insert.on_conflict_do_update(
                index_elements=[getattr(model, k) for k in keys],
                set_={c: getattr(insert.excluded, c) for c in columns},
            )
            self._statements[model.__tablename__] = statement
        return statement

    def _write_attrs(self, session: Any, model: Any, trial_id: int, attrs: dict[str, Any]) -> None:
        """Add a trial's user or system attributes (``model``) to ``session``: one cached
        upsert over all of them on SQLite and PostgreSQL, Optuna's write for each
        elsewhere."""
        import json

        if not attrs:
            return
        backend = self._backend
        if backend.engine.name not in ("sqlite", "postgresql"):
            for key, value in attrs.items():
                backend._set_trial_attr_without_commit(session, model, trial_id, key, value)
            return
        rows = [
            {"trial_id": trial_id, "key": k, "value_json": json.dumps(v)} for k, v in attrs.items()
        ]
        session.execute(self._upsert(model, ("trial_id", "key"), ("value_json",)), rows)

    def _forget(self, trial_id: int, written: dict[str, Any]) -> None:
        """Drop from the buffers what ``written`` holds (committed now); anything buffered
        meanwhile stays."""
        params = self._pending.get(trial_id)
        if params is not None:
            del params[: len(written["params"])]
            if not params:
                del self._pending[trial_id]
        for buffers, key in (
            (self._pending_attrs, "attrs"),
            (self._pending_user_attrs, "user_attrs"),
            (self._reports, "reports"),
        ):
            pending = buffers.get(trial_id)
            if pending is None:
                continue
            for name, value in written[key].items():
                if name in pending and pending[name] == value:
                    del pending[name]
            if not pending:
                del buffers[trial_id]

    def _insert(self, model: Any) -> Any:
        from sqlalchemy.dialects import postgresql, sqlite

        insert = sqlite.insert if self._backend.engine.name == "sqlite" else postgresql.insert
        return insert(model)

    def get_trial(self, trial_id: int) -> Any:
        import copy

        owned = self._own(trial_id)
        if owned is not None:
            return copy.deepcopy(owned)
        self.flush_params(trial_id)
        return super().get_trial(trial_id)

    def get_trial_param(self, trial_id: int, param_name: str) -> float:
        self.flush_params(trial_id)
        return super().get_trial_param(trial_id, param_name)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        self.flush_params(trial_id)
        owned = self._own(trial_id)
        if owned is None or self._backend.engine.name not in ("sqlite", "postgresql"):
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            if owned is not None:
                owned.intermediate_values[step] = intermediate_value
            return
        owned.intermediate_values[step] = intermediate_value
        self._reports.setdefault(trial_id, {})[step] = intermediate_value
        written = self._reports_written.setdefault(trial_id, time.monotonic())
        if time.monotonic() - written >= self.refresh:
            self.flush_reports(trial_id)

    def flush_reports(self, trial_id: int) -> None:
        """Write the trial's buffered reports (and whatever else is buffered for it) in
        one transaction (see the module docstring)."""
        self._reports_written[trial_id] = time.monotonic()
        self._write_buffered([trial_id], reports=True)

    def _flush(self, trial_id: int) -> None:
        """Everything buffered for the trial, before another write to it."""
        self._write_buffered([trial_id], reports=True)

    def set_trial_user_attr(self, trial_id: int, key: str, value: Any) -> None:
        self.set_trial_user_attrs(trial_id, {key: value})

    def set_trial_system_attr(self, trial_id: int, key: str, value: Any) -> None:
        """A running trial of this process's: buffered, and written with its parameters
        (TPE's relative parameters, set just before them: one transaction a trial
        fewer); any other: written now."""
        owned = self._own(trial_id)
        if owned is not None:
            self._pending_attrs.setdefault(trial_id, {})[key] = value
            owned._system_attrs[key] = value
            return
        self._flush(trial_id)
        super().set_trial_system_attr(trial_id, key, value)

    # ------------------------------------------------------------------ reads

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._lock = threading.Lock()

    def read_now(self) -> None:
        """Make the next read go to the database, whatever the refresh interval."""
        self._last_read.clear()

    def _read_trials_from_remote_storage(self, study_id: int) -> None:
        last = self._last_read.get(study_id)
        if last is not None and time.monotonic() - last < self.refresh:
            return
        super()._read_trials_from_remote_storage(study_id)
        self._last_read[study_id] = time.monotonic()

    def _add_trials_to_cache(self, study_id: int, trials: list[Any]) -> None:
        super()._add_trials_to_cache(study_id, trials)
        if trials:
            self._generation += 1

    def delete_study(self, study_id: int) -> None:
        super().delete_study(study_id)
        self._generation += 1

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[Any]:
        """As Optuna's, without filtering and sorting every trial on every call: the
        pruner and the sampler ask for the trials some fifteen times a trial, and at 1,000
        trials that was a fifth of the bookkeeping. The sorted list is kept until the
        cache's trials change."""
        import copy

        self._read_trials_from_remote_storage(study_id)
        wanted = None if states is None else frozenset(s for s in TrialState if s in states)
        key = (study_id, wanted)
        with self._lock:
            made = self._sorted.get(key)
            if made is None or made[0] != self._generation:
                by_number = self._studies[study_id].trials
                ordered = [by_number[n] for n in sorted(by_number)]
                if wanted is not None:
                    ordered = [t for t in ordered if t.state in wanted]
                made = (self._generation, ordered)
                self._sorted[key] = made
            listed = made[1]
            if self._owned:
                # This process's running trials as they are now, not as last read: the
                # cache's copy lacked what was written since (the parameters and TPE's
                # relative parameters of a pack's trials asked a moment ago), so a
                # sampler's constant liar saw them or not as the refresh timer fell, and
                # a seeded --pack run proposed different trials from one run to the next.
                owned = self._owned
                listed = [
                    owned.get(t._trial_id, t) if t.state == TrialState.RUNNING else t
                    for t in listed
                ]
        return copy.deepcopy(listed) if deepcopy else list(listed)

    def create_new_trial(self, study_id: int, template_trial: Any = None) -> int:
        import copy

        from optuna.storages._cached_storage import _StudyInfo

        frozen = self._backend._create_new_trial(study_id, template_trial)
        with self._lock:
            if study_id not in self._studies:
                self._studies[study_id] = _StudyInfo()
            self._add_trials_to_cache(study_id, [frozen])
        if template_trial is None and frozen.state == TrialState.RUNNING:
            # Asked by this process: served from memory, and already in the cache, so
            # nothing needs re-reading.
            self._owned[frozen._trial_id] = copy.deepcopy(frozen)
        else:
            self._last_read.clear()
        return int(frozen._trial_id)

    def _adopt(self, trial_id: int) -> None:
        """Start serving a running trial of this process from memory."""
        import copy

        trial = self._backend.get_trial(trial_id)
        if trial.state == TrialState.RUNNING:
            self._owned[trial_id] = copy.deepcopy(trial)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        owned = self._own(trial_id)
        if (
            owned is not None
            and state.is_finished()
            and self._backend.engine.name in ("sqlite", "postgresql")
        ):
            return self._finish(trial_id, owned, state, values)
        self._flush(trial_id)
        owned = self._owned.pop(trial_id, None)
        self._reports_written.pop(trial_id, None)
        try:
            if state == TrialState.RUNNING and values is None:
                changed = self._claim_waiting(trial_id)
            else:
                changed = super().set_trial_state_values(trial_id, state=state, values=values)
        except BaseException:
            self._last_read.clear()
            raise
        if changed and state == TrialState.RUNNING:
            self._adopt(trial_id)  # a waiting trial this process just claimed
        if changed and owned is not None and state.is_finished():
            self._cache_finished(owned, state, values)
        else:
            self._last_read.clear()
        return changed

    def _finish(
        self, trial_id: int, owned: Any, state: TrialState, values: Sequence[float] | None
    ) -> bool:
        """This process's running trial ends: everything buffered for it (attributes,
        reports) and its end (state, values, time), in one transaction, as Optuna's
        ``set_trial_state_values`` writes the end (two or three transactions a trial
        fewer, most of a trial's bookkeeping on SQLite)."""
        import datetime

        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import exc

        backend = self._backend
        trials = models.TrialModel.__table__
        try:
            with _create_scoped_session(backend.scoped_session) as session:
                self._check_updatable(session, trial_id, lock=True)
                written = self._write_into(session, trial_id, reports=True)
                if values:
                    model = models.TrialValueModel
                    rows = []
                    for objective, value in enumerate(values):
                        stored, kind = model.value_to_stored_repr(value)
                        rows.append(
                            {
                                "trial_id": trial_id,
                                "objective": objective,
                                "value": stored,
                                "value_type": kind,
                            }
                        )
                    columns = ("value", "value_type")
                    upsert = self._upsert(model, ("trial_id", "objective"), columns)
                    session.execute(upsert, rows)
                session.execute(
                    sqlalchemy.update(trials)
                    .where(trials.c.trial_id == trial_id)
                    .values(state=state, datetime_complete=datetime.datetime.now())
                )
        except exc.IntegrityError:
            self._last_read.clear()
            return False
        except BaseException:
            self._last_read.clear()
            raise
        self._forget(trial_id, written)
        self._owned.pop(trial_id, None)
        self._reports_written.pop(trial_id, None)
        self._cache_finished(owned, state, values)
        return True

    def _claim_waiting(self, trial_id: int) -> bool:
        """Make a WAITING trial this process's RUNNING one in one conditional UPDATE,
        true when it was still waiting. Optuna reads the state, then writes it; on SQLite
        the read takes no lock (SELECT FOR UPDATE is not SQL SQLite has), so two processes
        both read WAITING and both ran the same retried or enqueued trial, or one of them
        failed at its end with UpdateFinishedTrialError."""
        import datetime

        import sqlalchemy
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        trials = models.TrialModel.__table__
        claim = (
            sqlalchemy.update(trials)
            .where(trials.c.trial_id == trial_id, trials.c.state == TrialState.WAITING)
            .values(state=TrialState.RUNNING, datetime_start=datetime.datetime.now())
        )
        with _create_scoped_session(self._backend.scoped_session) as session:
            result: Any = session.execute(claim)  # a CursorResult: rows it changed
            claimed = result.rowcount == 1
        return bool(claimed)

    def _cache_finished(
        self, trial: Any, state: TrialState, values: Sequence[float] | None
    ) -> None:
        """Put this process's trial into the cache as just told, as the database has it."""
        import datetime

        trial.state = state
        trial.values = list(values) if values is not None else None
        trial.datetime_complete = datetime.datetime.now()
        with self._lock:
            where = self._trial_id_to_study_id_and_number.get(trial._trial_id)
            if where is None or where[0] not in self._studies:
                self._last_read.clear()
                return
            self._studies[where[0]].trials[trial.number] = trial
            self._generation += 1

    def set_trial_user_attrs(self, trial_id: int, attrs: dict[str, Any]) -> None:
        """Set several user attributes: of this process's running trial, buffered and
        written with its next write (its end at the latest, in the same transaction);
        of any other, in one transaction now."""
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        owned = self._own(trial_id)
        if owned is not None:
            owned._user_attrs.update(attrs)
            self._pending_user_attrs.setdefault(trial_id, {}).update(attrs)
            return
        self._flush(trial_id)
        with _create_scoped_session(self._backend.scoped_session, True) as session:
            self._check_updatable(session, trial_id)
            self._write_attrs(session, models.TrialUserAttributeModel, trial_id, attrs)
