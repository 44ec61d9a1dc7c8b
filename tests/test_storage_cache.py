"""storage_cache.RunStorage: fewer reads, never a stale view of its own trials, user
attributes in one write; and the cheap best-trial rule of the run loop."""

from __future__ import annotations

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from automl.storage_cache import RunStorage
from automl.studies import _best_numbers


def _study(storage: object, name: str = "s", direction: str = "minimize") -> optuna.Study:
    return optuna.create_study(
        study_name=name, storage=storage, direction=direction, load_if_exists=True
    )


def test_own_trials_are_seen_at_once_and_others_after_refresh(storage_url: str) -> None:
    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    trial = study.ask()
    study.tell(trial, 1.0)
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE]  # own tell: seen
    other = _study(storage_url)  # another worker, its own connection
    other.tell(other.ask(), 0.5)
    assert len(study.get_trials()) == 1  # within the refresh interval: not re-read
    study.ask()  # its own new trial is in the cache at once, without a read
    assert sorted(t.state.name for t in study.get_trials()) == ["COMPLETE", "RUNNING"]
    mine.refresh = 0.0  # once the interval has passed, the other worker's trial shows
    states = sorted(t.state.name for t in study.get_trials())
    assert states == ["COMPLETE", "COMPLETE", "RUNNING"]
    fresh = RunStorage(RDBStorage(storage_url), refresh=0.0)
    other.tell(other.ask(), 0.1)
    assert len(_study(fresh).get_trials()) == 4


def _stored_reports(storage_url: str, number: int = 0) -> dict[int, float]:
    return optuna.load_study(study_name="s", storage=storage_url).trials[number].intermediate_values


def test_reports_are_buffered_then_written_at_the_end_in_order(storage_url: str) -> None:
    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    trial = study.ask()
    for step, value in enumerate([0.9, 0.7, 0.4]):
        trial.report(value, step)
    assert trial.should_prune() is False  # the pruner reads the trial from memory
    assert mine.get_trial(trial._trial_id).intermediate_values == {0: 0.9, 1: 0.7, 2: 0.4}
    assert _stored_reports(storage_url) == {}  # not written yet
    study.tell(trial, 0.4)
    assert _stored_reports(storage_url) == {0: 0.9, 1: 0.7, 2: 0.4}
    finished = study.get_trials()[0]  # the cache holds what was told, as stored
    stored = optuna.load_study(study_name="s", storage=storage_url).trials[0]
    assert (finished.state, finished.values, finished.params) == (
        stored.state,
        stored.values,
        stored.params,
    )


def test_reports_are_written_after_the_refresh_interval_and_on_flush(storage_url: str) -> None:
    mine = RunStorage(RDBStorage(storage_url), refresh=0.0)
    study = _study(mine)
    trial = study.ask()
    trial.report(0.5, 0)  # refresh 0: written at once
    assert _stored_reports(storage_url) == {0: 0.5}
    mine.refresh = 3600
    trial.report(0.25, 1)
    assert _stored_reports(storage_url) == {0: 0.5}
    mine.flush_reports(trial._trial_id)  # what a checkpoint save calls first
    assert _stored_reports(storage_url) == {0: 0.5, 1: 0.25}
    trial.report(0.125, 2)
    trial.set_user_attr("k", 1)  # buffered too: written with the trial's end
    assert _stored_reports(storage_url) == {0: 0.5, 1: 0.25}
    assert trial.user_attrs == {"k": 1}  # (read from memory)
    from sqlalchemy import event

    commits: list[int] = []
    event.listen(mine._backend.engine, "commit", lambda _conn: commits.append(1))
    study.tell(trial, 0.125)
    assert len(commits) == 1  # attributes, reports and the end in one transaction
    stored = optuna.load_study(study_name="s", storage=storage_url).trials[0]
    assert stored.intermediate_values == {0: 0.5, 1: 0.25, 2: 0.125}
    assert (stored.user_attrs, stored.state, stored.value) == ({"k": 1}, TrialState.COMPLETE, 0.125)


def test_user_attrs_in_one_write_round_trip_and_overwrite(storage_url: str) -> None:
    study = _study(RunStorage(RDBStorage(storage_url)))
    trial = study.ask()
    storage = study._storage
    assert isinstance(storage, RunStorage)
    storage.set_trial_user_attrs(trial._trial_id, {"a": 1, "b": [1, 2], "c": "x"})
    storage.set_trial_user_attrs(trial._trial_id, {"a": 2.5, "d": None})
    study.tell(trial, 0.0)
    attrs = _study(storage_url).trials[0].user_attrs
    assert attrs == {"a": 2.5, "b": [1, 2], "c": "x", "d": None}
    with pytest.raises(RuntimeError):  # a finished trial is not updatable
        storage.set_trial_user_attrs(trial._trial_id, {"a": 3})


def test_best_numbers_keeps_ties_like_best_trials(storage_url: str) -> None:
    study = _study(storage_url, direction="maximize")
    assert _best_numbers(study) == []
    for value in (0.5, 0.9, 0.9, 0.1):
        study.tell(study.ask(), value)
    study.tell(study.ask(), state=TrialState.PRUNED)
    assert _best_numbers(study) == [t.number for t in study.best_trials] == [1, 2]
    pareto = optuna.create_study(storage=storage_url, directions=["minimize", "maximize"])
    for values in ([1.0, 1.0], [2.0, 2.0], [2.0, 0.5], [0.5, 0.5]):
        pareto.tell(pareto.ask(), values)
    assert sorted(_best_numbers(pareto)) == sorted(t.number for t in pareto.best_trials)


def test_parameters_are_written_together_before_anything_else(storage_url: str) -> None:
    storage = RunStorage(RDBStorage(storage_url))
    study = _study(storage)
    trial = study.ask()
    trial.suggest_float("x", 0.0, 1.0)
    trial.suggest_categorical("c", ["a", "b"])
    assert _study(storage_url).trials[0].params == {}  # buffered
    storage.flush_params(trial._trial_id)
    assert set(_study(storage_url).trials[0].params) == {"x", "c"}
    trial.suggest_int("n", 1, 3)
    trial.report(0.5, 0)  # any other write to the trial writes the buffer first
    assert set(_study(storage_url).trials[0].params) == {"x", "c", "n"}
    study.tell(trial, 1.0)
    with pytest.raises(ValueError):  # a clashing distribution is refused at once
        study.ask().suggest_int("x", 0, 5)


def test_listed_trials_follow_every_change_in_order_and_by_state(storage_url: str) -> None:
    """get_all_trials keeps its sorted lists between changes: each ask, tell and re-read
    shows at once, filtered by state, and a caller's list is its own to change."""
    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    complete = (TrialState.COMPLETE,)
    trials = [study.ask() for _ in range(5)]
    for i, trial in enumerate(trials[:4]):
        if i == 2:
            study.tell(trial, state=TrialState.PRUNED)
        else:
            study.tell(trial, float(i))
    assert [t.number for t in study.get_trials(deepcopy=False)] == [0, 1, 2, 3, 4]
    assert [t.number for t in study.get_trials(deepcopy=False, states=complete)] == [0, 1, 3]
    study.get_trials(deepcopy=False).clear()  # the caller's list, not the cache's
    assert len(study.get_trials(deepcopy=False)) == 5
    study.tell(trials[4], 9.0)
    assert [t.number for t in study.get_trials(deepcopy=False, states=complete)] == [0, 1, 3, 4]
    other = _study(storage_url)  # another worker's trial shows once the cache re-reads
    other.tell(other.ask(), 0.5)
    mine.read_now()
    assert [t.number for t in study.get_trials(deepcopy=False, states=complete)] == [
        0,
        1,
        3,
        4,
        5,
    ]
    assert study.get_trials()[5].state == TrialState.COMPLETE


def _claim_all(url: str, queue: object) -> None:
    """A worker process: ask until no waiting trial is left, tell each one it got."""
    storage = RunStorage(RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}}))
    study = optuna.load_study(study_name="q", storage=storage)
    got = []
    while True:
        trial = study.ask()
        fixed = trial.storage.get_trial_system_attrs(trial._trial_id).get("fixed_params")
        if fixed is None:  # a fresh trial: the queue is empty
            study.tell(trial, state=TrialState.FAIL)
            break
        got.append(fixed["x"])
        study.tell(trial, fixed["x"])
    queue.put(got)  # type: ignore[attr-defined]


def test_a_waiting_trial_is_claimed_by_one_process_only(storage_url: str) -> None:
    """Optuna reads a waiting trial's state and then writes it; on SQLite the read takes
    no lock, so two processes could both claim one retried or enqueued trial."""
    import multiprocessing

    mine = RunStorage(RDBStorage(storage_url))
    study = _study(mine, "q")
    for x in range(30):
        study.enqueue_trial({"x": x})
    waiting = [t._trial_id for t in study.get_trials() if t.state == TrialState.WAITING]
    assert mine.set_trial_state_values(waiting[0], TrialState.RUNNING) is True
    assert mine.set_trial_state_values(waiting[0], TrialState.RUNNING) is False  # taken
    mine.set_trial_state_values(waiting[0], TrialState.FAIL)
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [context.Process(target=_claim_all, args=(storage_url, queue)) for _ in range(3)]
    for w in workers:
        w.start()
    claimed = [x for _ in workers for x in queue.get(timeout=120)]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    assert sorted(claimed) == list(range(1, 30))  # each once, none twice


def test_own_running_trials_are_listed_as_they_are_now(storage_url: str) -> None:
    """A sampler's constant liar lists the running trials: this process's must show what
    was set on them since the last read (a pack's trials asked a moment ago). The cache's
    copy, read back from the database before their parameters were written, lacked them,
    so whether the liar saw them hung on the refresh timer, and seeded --pack runs
    proposed different trials from one run to the next."""
    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    trial = study.ask()
    mine.read_now()
    assert [t.params for t in study.get_trials()] == [{}]  # read back from the database
    x = trial.suggest_float("x", 0.0, 1.0)
    study._storage.set_trial_system_attr(trial._trial_id, "tpe:relative_params:0", "{}")
    listed = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    assert [t.params for t in listed] == [{"x": x}]
    assert listed[0].system_attrs["tpe:relative_params:0"] == "{}"
    study.tell(trial, 1.0)  # finished: listed as the cache holds it
    assert [(t.state, t.params) for t in study.get_trials()] == [(TrialState.COMPLETE, {"x": x})]


def test_system_attributes_of_own_running_trials_go_with_their_parameters(
    storage_url: str,
) -> None:
    """TPE stores its relative parameters as a system attribute just before the trial's
    parameters are suggested: buffered, they are written with them, one transaction."""
    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    trial = study.ask()
    mine.set_trial_system_attr(trial._trial_id, "tpe:relative_params:0", '{"x": 0.5}')
    stored = optuna.load_study(study_name="s", storage=storage_url).trials[0]
    assert "tpe:relative_params:0" not in stored.system_attrs  # not written yet
    assert mine.get_trial(trial._trial_id).system_attrs["tpe:relative_params:0"] == '{"x": 0.5}'
    x = trial.suggest_float("x", 0.0, 1.0)
    from sqlalchemy import event

    writes: list[str] = []
    event.listen(mine._backend.engine, "commit", lambda _conn: writes.append("commit"))
    mine.flush_params(trial._trial_id)
    assert writes == ["commit"]  # parameters and attribute together
    stored = optuna.load_study(study_name="s", storage=storage_url).trials[0]
    assert stored.params == {"x": x}
    assert stored.system_attrs["tpe:relative_params:0"] == '{"x": 0.5}'
    # Another process's trial: written at once, as Optuna writes it.
    theirs = _study(storage_url).ask()
    mine.set_trial_system_attr(theirs._trial_id, "note", 1)
    stored = optuna.load_study(study_name="s", storage=storage_url).trials[1]
    assert stored.system_attrs["note"] == 1


def test_a_packs_parameters_are_written_in_one_transaction(storage_url: str) -> None:
    from sqlalchemy import event

    mine = RunStorage(RDBStorage(storage_url), refresh=3600)
    study = _study(mine)
    trials = [study.ask() for _ in range(3)]
    values = [t.suggest_float("x", 0.0, 1.0) for t in trials]
    commits: list[int] = []
    event.listen(mine._backend.engine, "commit", lambda _conn: commits.append(1))
    mine.flush_trials([t._trial_id for t in trials])
    assert len(commits) == 1
    stored = optuna.load_study(study_name="s", storage=storage_url).trials
    assert [t.params for t in stored] == [{"x": v} for v in values]
    mine.flush_trials([t._trial_id for t in trials])  # nothing left to write: no transaction
    assert len(commits) == 1
