"""Job specs and lr schedules: wire round trips, validation that names the field, lr values."""

from __future__ import annotations

import itertools
import math
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2pdl.errors import ConfigError
from p2pdl.schedule.job import LR_KINDS, Job, LRSchedule

plain_leaves = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=8)
)
plain_values = st.recursive(
    plain_leaves,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=12,
)
identifiers = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)


@st.composite
def lr_schedules(draw: st.DrawFn) -> LRSchedule:
    base_lr = draw(st.floats(min_value=0.0, max_value=10.0))
    return LRSchedule(
        base_lr=base_lr,
        kind=draw(st.sampled_from(LR_KINDS)),
        warmup_steps=draw(st.integers(0, 50)),
        gamma=draw(st.floats(min_value=1e-3, max_value=1.0)),
        step_size=draw(st.integers(1, 100)),
        min_lr=draw(st.floats(min_value=0.0, max_value=base_lr)),
    )


@st.composite
def jobs(draw: st.DrawFn) -> Job:
    dataset_size = draw(st.integers(1, 10**9))
    global_batch = draw(st.integers(1, min(dataset_size, 10**6)))
    max_nodes = draw(st.integers(1, min(global_batch, 1024)))
    module = ".".join(draw(st.lists(identifiers, min_size=1, max_size=3)))
    attr = ".".join(draw(st.lists(identifiers, min_size=1, max_size=2)))
    return Job(
        task=f"{module}:{attr}",
        params=draw(st.dictionaries(st.text(max_size=6), plain_values, max_size=4)),
        dataset_size=dataset_size,
        global_batch=global_batch,
        epochs=draw(st.integers(1, 1000)),
        seed=draw(st.integers(0, 2**64 - 1)),
        lr=draw(lr_schedules()),
        min_nodes=draw(st.integers(1, max_nodes)),
        max_nodes=max_nodes,
        group_size=draw(st.just("auto") | st.integers(1, 10**6)),
        drop_last=draw(st.booleans()),
    )


def through_msgpack(value: Any) -> Any:
    return msgpack.unpackb(msgpack.packb(value), raw=False)


def valid_wire() -> dict[str, Any]:
    return Job(
        task="examples.mnist:make_task",
        params={"hidden": [128, 64], "dropout": 0.1, "name": "mlp", "bias": True, "x": None},
        dataset_size=1000,
        global_batch=32,
        epochs=3,
        seed=7,
        lr=LRSchedule(base_lr=0.1, kind="cosine", warmup_steps=5, min_lr=0.001),
        min_nodes=2,
        max_nodes=8,
        group_size=10,
        drop_last=True,
    ).to_wire()


# ---------------------------------------------------------------- round trips


@settings(max_examples=150, deadline=None)
@given(jobs())
def test_wire_round_trip_through_msgpack(job: Job) -> None:
    wire = job.to_wire()
    back = Job.from_wire(through_msgpack(wire))
    assert back == job
    assert back.to_wire() == wire
    assert Job.from_mapping(through_msgpack(wire)) == job


def test_from_mapping_defaults_and_number_lr() -> None:
    job = Job.from_mapping(
        {"task": "pkg.mod:fn", "dataset_size": 100, "global_batch": 10, "lr": 0.5, "max_nodes": 4}
    )
    assert job.lr == LRSchedule(base_lr=0.5, kind="constant")
    assert (job.epochs, job.seed, job.min_nodes, job.group_size, job.drop_last) == (
        1,
        0,
        1,
        "auto",
        True,
    )
    assert job.params == {}
    assert job.steps_per_epoch == 10


def test_params_are_copied_and_tuples_become_lists() -> None:
    params: dict[str, Any] = {"layers": (1, 2), "nested": {"a": [1]}}
    job = Job(
        task="m:f", dataset_size=4, global_batch=2, lr=LRSchedule(0.1), max_nodes=2, params=params
    )
    params["nested"]["a"].append(2)
    assert job.params == {"layers": [1, 2], "nested": {"a": [1]}}


def test_int_learning_rates_normalise_to_float() -> None:
    assert LRSchedule(base_lr=1, gamma=1, min_lr=0) == LRSchedule(
        base_lr=1.0, gamma=1.0, min_lr=0.0
    )
    assert isinstance(LRSchedule(base_lr=1).base_lr, float)


# ---------------------------------------------------------------- steps


@pytest.mark.parametrize(
    ("dataset_size", "batch", "epochs", "drop_last", "per_epoch", "last_batch"),
    [
        (100, 10, 3, True, 10, 10),
        (105, 10, 3, True, 10, 10),
        (105, 10, 3, False, 11, 5),
        (100, 10, 2, False, 10, 10),
        (7, 7, 1, True, 1, 7),
    ],
)
def test_steps_per_epoch_and_batches(
    dataset_size: int, batch: int, epochs: int, drop_last: bool, per_epoch: int, last_batch: int
) -> None:
    job = Job(
        task="m:f",
        dataset_size=dataset_size,
        global_batch=batch,
        epochs=epochs,
        lr=LRSchedule(0.1),
        max_nodes=1,
        drop_last=drop_last,
    )
    assert job.steps_per_epoch == per_epoch
    assert job.total_steps == per_epoch * epochs
    assert job.batch_at(per_epoch - 1) == last_batch
    if epochs > 1:
        assert job.batch_at(per_epoch) == batch
    with pytest.raises(ConfigError, match="step"):
        job.batch_at(job.total_steps)


# ---------------------------------------------------------------- validation


def _drop(field: str) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        del d[field]

    return mutate


def _set(field: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d[field] = value

    return mutate


def _set_lr(field: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        d["lr"][field] = value

    return mutate


MALFORMED: list[tuple[str, Any, str]] = [
    ("missing global_batch", _drop("global_batch"), "global_batch"),
    ("missing task", _drop("task"), "task"),
    ("unknown field", _set("gloabl_batch", 3), "gloabl_batch"),
    ("dataset_size str", _set("dataset_size", "1000"), "dataset_size"),
    ("dataset_size float", _set("dataset_size", 1000.0), "dataset_size"),
    ("dataset_size negative", _set("dataset_size", -1), "dataset_size"),
    ("dataset_size zero", _set("dataset_size", 0), "dataset_size"),
    ("global_batch zero", _set("global_batch", 0), "global_batch"),
    ("global_batch > dataset", _set("global_batch", 1001), "global_batch"),
    ("epochs bool", _set("epochs", True), "epochs"),
    ("epochs zero", _set("epochs", 0), "epochs"),
    ("seed negative", _set("seed", -1), "seed"),
    ("seed too big", _set("seed", 2**64), "seed"),
    ("min_nodes > max_nodes", _set("min_nodes", 9), "min_nodes"),
    ("min_nodes zero", _set("min_nodes", 0), "min_nodes"),
    ("max_nodes > global_batch", _set("max_nodes", 33), "max_nodes"),
    ("max_nodes none", _set("max_nodes", None), "max_nodes"),
    ("task no colon", _set("task", "examples.mnist"), "task"),
    ("task empty attr", _set("task", "examples.mnist:"), "task"),
    ("task empty module", _set("task", ":make"), "task"),
    ("task spaces", _set("task", "examples mnist:make"), "task"),
    ("task digit", _set("task", "1mod:make"), "task"),
    ("task two colons", _set("task", "a:b:c"), "task"),
    ("task empty part", _set("task", "a..b:c"), "task"),
    ("task int", _set("task", 5), "task"),
    ("params list", _set("params", [1, 2]), "params"),
    ("params bytes", _set("params", {"k": b"raw"}), "params"),
    ("params set", _set("params", {"k": {1, 2}}), "params"),
    ("params object", _set("params", {"k": object()}), "params"),
    ("params nan", _set("params", {"k": [math.nan]}), "params"),
    ("params int key", _set("params", {"k": {1: 2}}), "params"),
    ("params huge int", _set("params", {"k": 2**64}), "params"),
    ("group_size zero", _set("group_size", 0), "group_size"),
    ("group_size word", _set("group_size", "big"), "group_size"),
    ("group_size float", _set("group_size", 2.5), "group_size"),
    ("group_size bool", _set("group_size", True), "group_size"),
    ("drop_last str", _set("drop_last", "yes"), "drop_last"),
    ("drop_last int", _set("drop_last", 1), "drop_last"),
    ("lr str", _set("lr", "0.1"), "lr"),
    ("lr kind", _set_lr("kind", "exponential"), "lr.kind"),
    ("lr kind int", _set_lr("kind", 3), "lr.kind"),
    ("lr base negative", _set_lr("base_lr", -0.1), "lr.base_lr"),
    ("lr base nan", _set_lr("base_lr", math.nan), "lr.base_lr"),
    ("lr base inf", _set_lr("base_lr", math.inf), "lr.base_lr"),
    ("lr min > base", _set_lr("min_lr", 0.5), "lr.min_lr"),
    ("lr gamma zero", _set_lr("gamma", 0.0), "lr.gamma"),
    ("lr step_size zero", _set_lr("step_size", 0), "lr.step_size"),
    ("lr warmup negative", _set_lr("warmup_steps", -1), "lr.warmup_steps"),
    ("lr warmup float", _set_lr("warmup_steps", 1.5), "lr.warmup_steps"),
    ("lr unknown", _set_lr("momentum", 0.9), "momentum"),
]


@pytest.mark.parametrize("parse", [Job.from_wire, Job.from_mapping], ids=["wire", "mapping"])
@pytest.mark.parametrize(("case", "mutate", "field"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_spec_names_field(case: str, mutate: Any, field: str, parse: Any) -> None:
    wire = valid_wire()
    parse(wire)  # the unmutated spec is fine
    mutate(wire)
    with pytest.raises(ConfigError) as info:
        parse(wire)
    assert field in str(info.value), (case, str(info.value))


@pytest.mark.parametrize(
    "field", ["epochs", "seed", "min_nodes", "group_size", "drop_last", "params"]
)
def test_from_wire_requires_every_field(field: str) -> None:
    wire = valid_wire()
    del wire[field]
    with pytest.raises(ConfigError, match=field):
        Job.from_wire(wire)
    Job.from_mapping(wire)  # user specs may leave it out


@pytest.mark.parametrize("field", ["kind", "gamma", "min_lr"])
def test_from_wire_requires_every_lr_field(field: str) -> None:
    wire = valid_wire()
    del wire["lr"][field]
    with pytest.raises(ConfigError, match=field):
        Job.from_wire(wire)
    Job.from_mapping(wire)


@pytest.mark.parametrize("data", [None, [], "job", 3])
def test_spec_must_be_a_mapping(data: Any) -> None:
    for parse in (Job.from_wire, Job.from_mapping):
        with pytest.raises(ConfigError, match="job"):
            parse(data)


def test_constructor_validates_too() -> None:
    with pytest.raises(ConfigError, match="global_batch"):
        Job(task="m:f", dataset_size=10, global_batch=0, lr=LRSchedule(0.1), max_nodes=1)
    with pytest.raises(ConfigError, match="lr"):
        Job(task="m:f", dataset_size=10, global_batch=2, lr=0.1, max_nodes=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- learning rates


def test_constant_lr() -> None:
    lr = LRSchedule(base_lr=0.1)
    assert [lr.lr_at(s, 10) for s in (0, 5, 9)] == [0.1, 0.1, 0.1]


def test_step_lr_spot_values() -> None:
    lr = LRSchedule(base_lr=1.0, kind="step", gamma=0.5, step_size=10)
    assert [lr.lr_at(s, 100) for s in (0, 9, 10, 19, 20, 25)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]


def test_warmup_is_linear_then_schedule_starts() -> None:
    lr = LRSchedule(base_lr=0.4, kind="step", gamma=0.5, step_size=2, warmup_steps=4)
    got = [lr.lr_at(s, 100) for s in range(8)]
    assert got == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.4, 0.4, 0.2, 0.2])


def test_cosine_spot_values() -> None:
    lr = LRSchedule(base_lr=1.0, kind="cosine")
    assert lr.lr_at(0, 100) == pytest.approx(1.0)
    assert lr.lr_at(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr.lr_at(50, 100) == pytest.approx(0.5)
    assert lr.lr_at(99, 100) == pytest.approx(0.5 * (1 + math.cos(0.99 * math.pi)))
    with_floor = LRSchedule(base_lr=1.0, kind="cosine", min_lr=0.2, warmup_steps=10)
    assert with_floor.lr_at(4, 110) == pytest.approx(0.5)
    assert with_floor.lr_at(10, 110) == pytest.approx(1.0)
    assert with_floor.lr_at(60, 110) == pytest.approx(0.6)
    assert with_floor.lr_at(500, 110) == pytest.approx(0.2)


@settings(max_examples=100, deadline=None)
@given(lr_schedules(), st.integers(1, 500))
def test_lr_bounds_and_monotone_phases(lr: LRSchedule, total: int) -> None:
    values = [lr.lr_at(s, total) for s in range(total)]
    warm = values[: lr.warmup_steps]
    after = values[lr.warmup_steps :]
    tol = 1e-12 * max(1.0, lr.base_lr)
    assert all(a <= b + tol for a, b in itertools.pairwise(warm)), "warmup must not decrease"
    assert all(b <= a + tol for a, b in itertools.pairwise(after)), "decay must not increase"
    assert all(0.0 <= v <= lr.base_lr + tol for v in values)
    if lr.kind == "cosine":
        assert all(v >= lr.min_lr - tol for v in after)


@pytest.mark.parametrize(("step", "total"), [(-1, 10), (0, 0), (True, 10), (1.5, 10)])
def test_lr_at_rejects_bad_arguments(step: Any, total: Any) -> None:
    with pytest.raises(ConfigError):
        LRSchedule(0.1).lr_at(step, total)
