"""Property tests: whatever YAML-like structure reaches the space loader, it either gives a
valid Space or raises SpaceError, never KeyError, TypeError, ValidationError, ..."""

from __future__ import annotations

import copy
import math
import os
from typing import Any

import optuna
import yaml
from conftest import TINY_SPACE
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from automl import spaces
from automl.errors import SpaceError

# AUTOML_HYPOTHESIS_EXAMPLES=5000 for a long hunt; 200 keeps the suite quick.
SETTINGS = settings(
    max_examples=int(os.environ.get("AUTOML_HYPOTHESIS_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# Names the loader knows, so generated documents get past the first checks and deep
# into sections, ranges and optimizers.
VOCABULARY = sorted(
    {
        *spaces.SECTIONS,
        *spaces.SPACE_NAMES,
        *spaces.OPTIMIZER_PARAMS,
        *spaces.LOSS_PARAMS,
        *spaces.METRICS,
        *spaces.BUNDLED_DATASETS,
        *spaces.SAMPLERS,
        *spaces.PRUNERS,
        *spaces.ACTIVATIONS,
        *spaces.LR_SCHEDULES,
        *spaces.OPTIMIZER_RULES,
        *spaces.LOSS_RULES,
        "low",
        "high",
        "log",
        "step",
        "type",
        "choices",
        "float",
        "int",
        "categorical",
        "dataset",
        "path",
        "target",
        "drop",
        "task",
        "validation",
        "test",
        "epochs",
        "patience",
        "sampler",
        "pruner",
        "seed",
        "name",
        "auto",
        "classification",
        "regression",
        "mlp",
        "cnn",
    }
)

numbers = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, 1, -1, 0.0, 0.5, 1.0, 1e-5, 1e6, 16, 512]),
)
texts = st.one_of(st.sampled_from(VOCABULARY), st.text(max_size=12))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
keys = st.one_of(texts, st.integers(-3, 3), st.booleans(), st.none(), st.floats(0, 1))
yaml_like = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(keys, children, max_size=5),
    ),
    max_leaves=40,
)


def _check(raw: Any) -> spaces.Space | None:
    """Parse; the only error allowed is SpaceError, with a one-line message."""
    try:
        space = spaces.parse_space(raw, file="prop.yaml")
    except SpaceError as exc:
        message = str(exc)
        assert message.startswith("prop.yaml: ")
        assert "\n" not in message
        assert exc.errors and all("\n" not in line for line in exc.errors)
        return None
    return space


def _sample(space: spaces.Space) -> None:
    """A valid space can be sampled by a real Optuna trial, and the values obey it."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    trial = study.ask()
    config = spaces.suggest(trial, space, seed=0)
    assert config.optimizer in space.optimizer.names
    assert config.loss in space.loss.names
    assert config.batch_size >= 1 and config.hidden_units >= 1 and config.n_layers >= 1
    assert config.epochs >= 1
    assert 0.0 <= config.dropout < 1.0
    assert config.lr > 0 and math.isfinite(config.lr)
    if space.study.sampler.name == "grid":
        grid = spaces.grid_search_space(space)
        assert all(len(values) >= 1 for values in grid.values())


@SETTINGS
@given(yaml_like)
def test_arbitrary_structures_raise_only_space_error(raw: Any) -> None:
    space = _check(raw)
    if space is not None:
        _sample(space)


@SETTINGS
@given(st.dictionaries(st.sampled_from(spaces.SECTIONS), yaml_like, max_size=7))
def test_arbitrary_sections_raise_only_space_error(raw: dict[str, Any]) -> None:
    space = _check(raw)
    if space is not None:
        _sample(space)


VALID: dict[str, Any] = yaml.safe_load(TINY_SPACE)


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, (*prefix, i))
    return out


PATHS = [p for p in _paths(VALID) if p]


@st.composite
def mutated_spaces(draw: st.DrawFn) -> dict[str, Any]:
    """The valid tiny space with one to three edits: a value replaced by anything, a
    key deleted, or a key added next to it."""
    doc = copy.deepcopy(VALID)
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(PATHS))
        parent: Any = doc
        try:
            for step in path[:-1]:
                parent = parent[step]
            last = path[-1]
            parent[last]
        except (KeyError, IndexError, TypeError):
            continue
        action = draw(st.sampled_from(["replace", "delete", "add"]))
        if action == "replace":
            parent[last] = draw(yaml_like)
        elif action == "delete":
            del parent[last]
        elif isinstance(parent, dict):
            parent[draw(keys)] = draw(yaml_like)
        else:
            parent.append(draw(yaml_like))
    return doc


@SETTINGS
@given(mutated_spaces())
def test_mutations_of_a_valid_space_raise_only_space_error(raw: dict[str, Any]) -> None:
    space = _check(raw)
    if space is not None:
        _sample(space)


def test_the_unmutated_space_is_valid() -> None:
    """The property above starts from a space that really is valid."""
    space = _check(copy.deepcopy(VALID))
    assert space is not None
    _sample(space)


@SETTINGS
@given(st.text(max_size=200))
def test_arbitrary_text_raises_only_space_error(text: str) -> None:
    try:
        raw = spaces.load_yaml(text, file="prop.yaml")
    except SpaceError as exc:
        assert "\n" not in str(exc)
        return
    _check(raw)


YAML_PIECES = st.sampled_from(
    [
        "data:",
        "  dataset: iris",
        "space:",
        "  lr: {low: 1, high: 2}",
        "  batch_size: [16, 32",
        "\t",
        "&a",
        "*a",
        "!!python/object/apply:os.system ['true']",
        "!!int x",
        "2024-13-45",
        "? [1, 2]",
        ": 3",
        "- x",
        "{",
        "}",
        "'",
        '"',
        "|",
        ">",
        "---",
        "...",
        "%YAML 1.1",
        "!!binary zz",
        "!!set {a}",
        "!!timestamp 2024-99-01",
        "<<: *a",
        "0x1F",
        "1e309",
        ".nan",
    ]
)


@SETTINGS
@given(st.lists(st.tuples(YAML_PIECES, st.sampled_from([" ", "\n", "\n  ", ": "])), max_size=12))
def test_yaml_fragments_raise_only_space_error(pieces: list[tuple[str, str]]) -> None:
    text = "".join(a + b for a, b in pieces)
    try:
        raw = spaces.load_yaml(text, file="prop.yaml")
    except SpaceError:
        return
    _check(raw)


@SETTINGS
@given(st.text(max_size=40))
def test_the_flag_grammar_raises_only_space_error(spec: str) -> None:
    try:
        value = spaces.parse_spec(spec, where="--param dropout")
    except SpaceError:
        return
    doc = copy.deepcopy(VALID)
    doc["space"]["dropout"] = value
    _check(doc)


@SETTINGS
@given(st.dictionaries(st.sampled_from(spaces.SPACE_NAMES), st.text(max_size=20), max_size=4))
def test_flags_over_a_valid_space_raise_only_space_error(flags: dict[str, str]) -> None:
    parsed = {}
    for name, spec in flags.items():
        try:
            parsed[name] = spaces.parse_spec(spec, where=f"--param {name}")
        except SpaceError:
            continue
    assume(parsed)
    merged = spaces.merge_flags(copy.deepcopy(VALID), {"space": parsed})
    _check(merged)
