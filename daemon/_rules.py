"""Declarative rules: when an event matches a condition, do an action. No eval.

A rule (configuration section ``rules``, a list)::

    - name: follow
      when:
        topic: track
        condition: {any_row: {field: particle, op: ">=", value: 0}}
      pick: nearest_centre                 # which matching row the action refers to
      do:
        action: move_xy
        relative: true
        x_um: {mul: [{sub: [{field: x}, {context: centre_x_px}]}, {context: pixel_size_um}]}
        y_um: {mul: [{sub: [{field: y}, {context: centre_y_px}]}, {context: pixel_size_um}]}
      cooldown_s: 0
      max_firings: null
      priority: 0

Conditions (each a one-key mapping, except comparisons):

- ``{field: F, op: <|<=|>|>=|==|!=, value: V}``: compare a body field (or, inside a row
  condition, a column of the event's arrays) with a value;
- ``{all: [C, ...]}``, ``{any: [C, ...]}``, ``{not: C}``;
- ``{changed: F, key: K, to: V, from: V}``: F differs from its value in the previous event of the
  topic (per value of the key field K when given, e.g. per particle); ``to`` / ``from`` restrict
  the change. The first value seen counts as a change only when ``to`` is given ("becomes V");
- ``{any_row: C}`` / ``{all_rows: C}``: over the rows of the event's arrays (``track``:
  particle, x, y; ``localizations``: x, y, photons, ...). The rows that match are the ones the
  action can refer to; ``pick`` chooses one (``first``, ``nearest_centre``, ``{max: F}``,
  ``{min: F}``).

Values (in conditions and action parameters): a literal; ``{field: F}`` (the picked row's
column, else the body field); ``{initial: F}`` (the first value of body field F this rule saw);
``{context: C}`` with C one of ``centre_x_px, centre_y_px, width_px, height_px, pixel_size_um,
pixel_size_nm``, ``frame_interval_s`` (the frame period now, after any rate switch),
``frame_stage_x_um`` / ``frame_stage_y_um`` (where the XY stage was when the triggering frame's
exposure began: the stage position the event's pixel positions are relative to); arithmetic
``{add: [V, ...]}``, ``{sub: [V, V]}``, ``{mul: [V, ...]}``, ``{div: [V, V]}``; and
``{rate: V, key: F, smoothing: W}``: how fast V changes, per second, between this rule's
successive firings (per value of the picked row's field F, e.g. per particle), from the events'
acquisition times, exponentially averaged with weight W of a new sample (default 1: none); 0 the
first time a key is seen. With the frame-stage context it gives a particle's velocity in the
sample, for velocity feed-forward (``deploy/examples/follow_particle.yaml``).

Rules run in the daemon as their own sink (:class:`RulesSink`), on their own thread fed by a
small queue: never on the camera path. A rule fires at most once per matching event, not again
within ``cooldown_s``, and never more than ``max_firings`` times. Rules are tried in order of
``priority`` (higher first), then as listed; a rule whose action is ``stop_acquisition`` goes
first, and once a stop is asked nothing else fires. The limits apply to rules as to clients.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from scopestream.daemon._actuators import (
    ACTIONS,
    REQUEST_MODELS,
    ActionError,
    ActionService,
    Trigger,
    parse_action,
)

if TYPE_CHECKING:
    from scopestream.daemon._publish import Envelope

log = logging.getLogger(__name__)

# Columns of the arrays each topic carries (one element per row). Bodies declare their fields
# through their pydantic models; arrays are not in the models, so they are listed here.
ROW_COLUMNS: dict[str, tuple[str, ...]] = {
    "track": ("particle", "x", "y"),
    "localizations": ("x", "y", "photons", "background", "sigma", "uncertainty_px"),
    "diffusion": ("particle", "frame_start", "frame_end", "n_steps", "D_um2_per_s", "D_err_um2_per_s",
                  "D_crlb_um2_per_s", "sigma_loc_nm", "method", "window"),
}

CONTEXT_NAMES = ("centre_x_px", "centre_y_px", "width_px", "height_px", "pixel_size_um", "pixel_size_nm",
                 "frame_interval_s", "frame_stage_x_um", "frame_stage_y_um")


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)


# -- values ----------------------------------------------------------------------------------


class FieldRef(_Node):
    field: str = Field(min_length=1, description="Body field, or array column of the picked row; dotted for nested mappings.")


class InitialRef(_Node):
    initial: str = Field(min_length=1, description="The first value of this body field the rule saw.")


class ContextRef(_Node):
    context: Literal[
        "centre_x_px", "centre_y_px", "width_px", "height_px", "pixel_size_um", "pixel_size_nm",
        "frame_interval_s", "frame_stage_x_um", "frame_stage_y_um",
    ] = Field(
        description="A property of the run: the image centre (px, ((width - 1) / 2, (height - 1) / 2)), size, pixel "
        "size, the frame period (s, after any rate switch), the XY stage position when the triggering frame's exposure began (µm)."
    )


class Add(_Node):
    add: list[Value] = Field(min_length=2)


class Rate(_Node):
    rate: Value = Field(description="The value whose rate of change (per second) is taken.")
    key: str | None = Field(None, description="Per value of this field of the picked row (e.g. particle); None: one series.")
    smoothing: float = Field(1.0, gt=0, le=1, description="Weight of a new sample in the exponential average (1: none).")


class Sub(_Node):
    sub: tuple[Value, Value]


class Mul(_Node):
    mul: list[Value] = Field(min_length=2)


class Div(_Node):
    div: tuple[Value, Value]


_VALUE_KEYS = ("field", "initial", "context", "rate", "add", "sub", "mul", "div")


def _one_key_tag(keys: Sequence[str], fallback: str) -> Callable[[Any], str | None]:
    def tag(value: Any) -> str | None:
        if isinstance(value, BaseModel):
            names = type(value).model_fields
            for key in keys:
                if key in names or (key == "not" and "not_" in names) or (key == "from" and "from_" in names):
                    return key
            return None
        if isinstance(value, dict):
            for key in keys:
                if key in value:
                    return key
            return None  # pydantic reports "no tag": the mapping has none of the known keys
        return fallback

    return tag


Value = Annotated[
    Annotated[bool | int | float | str, Tag("literal")]
    | Annotated[FieldRef, Tag("field")]
    | Annotated[InitialRef, Tag("initial")]
    | Annotated[ContextRef, Tag("context")]
    | Annotated[Rate, Tag("rate")]
    | Annotated[Add, Tag("add")]
    | Annotated[Sub, Tag("sub")]
    | Annotated[Mul, Tag("mul")]
    | Annotated[Div, Tag("div")],
    Discriminator(
        _one_key_tag(_VALUE_KEYS, "literal"),
        custom_error_type="invalid_value",
        custom_error_message=f"a value is a literal or a mapping with one of the keys {list(_VALUE_KEYS)}",
    ),
]


# -- conditions ------------------------------------------------------------------------------

Op = Literal["<", "<=", ">", ">=", "==", "!="]


class Compare(_Node):
    field: str = Field(min_length=1, description="Body field (or array column inside any_row/all_rows).")
    op: Op = Field(description="Comparison.")
    value: Value = Field(description="What to compare with.")


class AllOf(_Node):
    all: list[Condition] = Field(min_length=1)


class AnyOf(_Node):
    any: list[Condition] = Field(min_length=1)


class Not(_Node):
    not_: Condition = Field(alias="not")


class Changed(_Node):
    changed: str = Field(min_length=1, description="Field whose change is looked for.")
    key: str | None = Field(None, description="Compare per value of this field (e.g. particle); None: per topic.")
    to: Value | None = Field(None, description="Only a change to this value (the first value seen counts).")
    from_: Value | None = Field(None, alias="from", description="Only a change from this value.")


class AnyRow(_Node):
    any_row: Condition


class AllRows(_Node):
    all_rows: Condition


_CONDITION_KEYS = ("field", "all", "any", "not", "changed", "any_row", "all_rows")

Condition = Annotated[
    Annotated[Compare, Tag("field")]
    | Annotated[AllOf, Tag("all")]
    | Annotated[AnyOf, Tag("any")]
    | Annotated[Not, Tag("not")]
    | Annotated[Changed, Tag("changed")]
    | Annotated[AnyRow, Tag("any_row")]
    | Annotated[AllRows, Tag("all_rows")],
    Discriminator(
        _one_key_tag(_CONDITION_KEYS, "invalid"),
        custom_error_type="invalid_condition",
        custom_error_message=f"a condition is a mapping with one of the keys {list(_CONDITION_KEYS)}",
    ),
]

for _model in (Rate, Add, Sub, Mul, Div, Compare, AllOf, AnyOf, Not, Changed, AnyRow, AllRows):
    _model.model_rebuild()


# -- rules -----------------------------------------------------------------------------------


class When(_Node):
    topic: str = Field(min_length=1, description="Topic of the events the rule looks at.")
    condition: Condition | None = Field(None, description="Condition on the event; None: every event of the topic.")


class PickBy(_Node):
    max: str | None = Field(None, description="The matching row with the largest value of this column.")
    min: str | None = Field(None, description="The matching row with the smallest value of this column.")

    @model_validator(mode="after")
    def _one(self) -> PickBy:
        if (self.max is None) == (self.min is None):
            raise ValueError("pick takes exactly one of 'max' or 'min'")
        return self


class Do(BaseModel):
    """The action: ``action`` plus its parameters, each a literal or a value expression."""

    model_config = ConfigDict(extra="allow", frozen=True)

    action: Literal[
        "move_xy", "move_z", "set_exposure", "set_interval", "shutter",
        "pause_acquisition", "resume_acquisition", "stop_acquisition", "run_mda", "mark",
    ] = Field(description="The action (parameters as in the control channel's act command).")

    @model_validator(mode="before")
    @classmethod
    def _params(cls, data: Any) -> Any:
        """Check and parse the parameters before the frozen model is built (its extra fields then
        hold the parsed values from the start)."""
        if not isinstance(data, Mapping) or data.get("action") not in REQUEST_MODELS:
            return data  # the `action` field reports it
        action = data["action"]
        model = REQUEST_MODELS[action]
        allowed = set(model.model_fields) - {"action"}
        extra = {k: v for k, v in data.items() if k != "action"}
        unknown = sorted(set(extra) - allowed)
        if unknown:
            raise ValueError(f"{action} takes no parameter(s) {unknown}; it takes {sorted(allowed)}")
        missing = sorted(n for n, f in model.model_fields.items() if n != "action" and f.is_required() and n not in extra)
        if missing:
            raise ValueError(f"{action} needs parameter(s) {missing}")
        from pydantic import TypeAdapter

        adapter: TypeAdapter[Any] = TypeAdapter(Value)
        parsed: dict[str, Any] = {}
        for name, raw in extra.items():
            if name == "sequence" or isinstance(raw, bool | int | float | str) or raw is None or isinstance(raw, BaseModel):
                parsed[name] = raw
            else:
                parsed[name] = adapter.validate_python(raw)
        if all(not isinstance(v, BaseModel) for v in parsed.values()):
            try:  # literal parameters only: the request must already be valid
                parse_action({"action": action, **parsed})
            except ActionError as exc:
                raise ValueError(str(exc)) from None
        return {"action": action, **parsed}

    def params(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RuleConfig(_Node):
    """One rule: when an event of ``when.topic`` matches ``when.condition``, ``do`` the action."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="Unique name; actions are published with it as requested_by.")
    when: When = Field(description="Topic and condition.")
    do: Do = Field(description="The action, as in an act command; parameters may refer to the event.")
    pick: Literal["first", "nearest_centre"] | PickBy = Field(
        "first", description="Which of the matching rows the action refers to (row conditions only)."
    )
    cooldown_s: float = Field(0.0, ge=0, description="After firing, the rule does not fire again for this long, s.")
    max_firings: int | None = Field(None, ge=1, description="The rule fires at most this many times per run; None: no limit.")
    priority: int = Field(0, description="Higher goes first among rules matching the same event; ties go in list order.")
    enabled: bool = Field(True, description="False keeps the rule in the configuration without running it.")


class RuleCheckError(ValueError):
    """A rule refers to a topic or field that does not exist."""


def check_rules(
    rules: Sequence[RuleConfig],
    topic_models: Mapping[str, type[BaseModel]],
    run_topics: Sequence[str] | None = None,
) -> None:
    """Check names and references of the rules against the topics' body models and arrays.

    Parameters
    ----------
    rules
        The ``rules`` section.
    topic_models
        Topic -> body model, for every topic the daemon could publish.
    run_topics
        Topics the configured stages publish; a rule on another topic could never fire.

    Raises
    ------
    RuleCheckError
        Naming the rule and the field (``rules[0] (follow): when.condition: no field 'D' ...``).
    """
    seen: set[str] = set()
    for i, rule in enumerate(rules):
        where = f"rules[{i}] ({rule.name})"
        if rule.name in seen:
            raise RuleCheckError(f"{where}: the name {rule.name!r} is used by an earlier rule")
        seen.add(rule.name)
        topic = rule.when.topic
        if topic not in topic_models:
            raise RuleCheckError(f"{where}: when.topic: no topic {topic!r}; topics are {sorted(topic_models)}")
        if run_topics is not None and topic not in run_topics:
            raise RuleCheckError(
                f"{where}: when.topic: {topic!r} is not published by this run's stages; add the stage that "
                f"publishes it to 'stages' (this run publishes {sorted(run_topics)})"
            )
        body_fields = set(topic_models[topic].model_fields)
        rows = ROW_COLUMNS.get(topic, ())
        scope = _Scope(where, topic, body_fields, rows)
        uses_rows = False
        if rule.when.condition is not None:
            uses_rows = scope.condition(rule.when.condition, "when.condition", in_rows=False)
        if rule.pick != "first" and not uses_rows:
            raise RuleCheckError(f"{where}: pick: {rule.pick!r} needs a row condition (any_row / all_rows) in when.condition")
        if isinstance(rule.pick, PickBy):
            column = rule.pick.max or rule.pick.min or ""
            scope.field(column, "pick", in_rows=True)
        for name, value in rule.do.params().items():
            if name == "sequence":
                continue
            scope.value(value, f"do.{name}", in_rows=uses_rows, action_params=True)


@dataclass
class _Scope:
    where: str
    topic: str
    body: set[str]
    rows: tuple[str, ...]

    def field(self, name: str, path: str, in_rows: bool, action_params: bool = False) -> None:
        head = name.split(".", 1)[0]
        if in_rows and (head in self.rows or head in self.body):
            return
        if not in_rows and head in self.body:
            return
        if action_params and head in self.rows:
            return
        known = sorted(self.body) if not in_rows else sorted({*self.rows, *self.body})
        hint = f"; its rows have columns {list(self.rows)} (use any_row / all_rows)" if self.rows and not in_rows else ""
        raise RuleCheckError(
            f"{self.where}: {path}: topic {self.topic!r} has no field {name!r}; fields are {known}{hint}"
        )

    def value(self, value: Any, path: str, in_rows: bool, action_params: bool = False) -> None:
        if isinstance(value, FieldRef):
            self.field(value.field, path, in_rows, action_params)
        elif isinstance(value, InitialRef):
            self.field(value.initial, path, in_rows=False)
        elif isinstance(value, Rate):
            self.value(value.rate, f"{path}.rate", in_rows, action_params)
            if value.key is not None:
                self.field(value.key, f"{path}.key", in_rows, action_params)
        elif isinstance(value, Add | Mul):
            for j, v in enumerate(value.add if isinstance(value, Add) else value.mul):
                self.value(v, f"{path}[{j}]", in_rows, action_params)
        elif isinstance(value, Sub | Div):
            for j, v in enumerate(value.sub if isinstance(value, Sub) else value.div):
                self.value(v, f"{path}[{j}]", in_rows, action_params)

    def condition(self, cond: Any, path: str, in_rows: bool) -> bool:
        """Check a condition; True if it selects rows."""
        if isinstance(cond, Compare):
            self.field(cond.field, f"{path}.field", in_rows)
            self.value(cond.value, f"{path}.value", in_rows)
            return False
        if isinstance(cond, AllOf | AnyOf):
            parts = cond.all if isinstance(cond, AllOf) else cond.any
            return any([self.condition(c, f"{path}.{'all' if isinstance(cond, AllOf) else 'any'}[{j}]", in_rows)
                        for j, c in enumerate(parts)])
        if isinstance(cond, Not):
            return self.condition(cond.not_, f"{path}.not", in_rows)
        if isinstance(cond, Changed):
            self.field(cond.changed, f"{path}.changed", in_rows)
            if cond.key is not None:
                self.field(cond.key, f"{path}.key", in_rows)
            for v in (cond.to, cond.from_):
                if v is not None:
                    self.value(v, path, in_rows)
            return False
        if isinstance(cond, AnyRow | AllRows):
            if not self.rows:
                raise RuleCheckError(f"{self.where}: {path}: topic {self.topic!r} carries no rows (arrays)")
            if in_rows:
                raise RuleCheckError(f"{self.where}: {path}: row conditions cannot be nested")
            inner = cond.any_row if isinstance(cond, AnyRow) else cond.all_rows
            self.condition(inner, f"{path}.{'any_row' if isinstance(cond, AnyRow) else 'all_rows'}", in_rows=True)
            return True
        raise RuleCheckError(f"{self.where}: {path}: not a condition")  # pragma: no cover


# -- evaluation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldOfView:
    """What ``{context: ...}`` values read.

    ``stage_xy_at(t)`` gives the XY stage position at Unix time t (None when unknown);
    ``frame_stage_*`` is it at the triggering frame's exposure start, ``exposure_s`` before its
    ``t_acquired``.
    """

    width_px: int
    height_px: int
    pixel_size_nm: float
    frame_interval_s: float | None = None
    exposure_s: float = 0.0
    stage_xy_at: Callable[[float], tuple[float, float] | None] | None = field(default=None, compare=False)

    def stage_at_frame(self, t_acquired: float | None) -> tuple[float, float] | None:
        """The stage position the frame acquired at ``t_acquired`` shows."""
        if t_acquired is None or self.stage_xy_at is None:
            return None
        return self.stage_xy_at(t_acquired - self.exposure_s)

    def get(self, name: str) -> float:
        if name == "centre_x_px":
            return (self.width_px - 1) / 2.0
        if name == "centre_y_px":
            return (self.height_px - 1) / 2.0
        if name == "pixel_size_um":
            return self.pixel_size_nm / 1000.0
        value = getattr(self, name)
        if value is None:
            raise _Missing(name)
        return float(value)


class _Missing(Exception):
    """A field the rule needs is absent (None) in this event: the rule does not match."""


_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b, "==": lambda a, b: a == b, "!=": lambda a, b: a != b,
}


@dataclass
class _Event:
    body: BaseModel
    arrays: Mapping[str, np.ndarray]
    n_rows: int
    context: FieldOfView | None
    t_acquired: float | None = None


def _get_body(body: BaseModel, name: str) -> Any:
    head, _, rest = name.partition(".")
    value = getattr(body, head, None)
    while rest and value is not None:
        key, _, rest = rest.partition(".")
        value = value.get(key) if isinstance(value, Mapping) else getattr(value, key, None)
    if value is None:
        raise _Missing(name)
    return value


class RuleState:
    """What one rule remembers between events: firings, last firing, changed-values, initials."""

    def __init__(self, rule: RuleConfig) -> None:
        self.rule = rule
        self.firings = 0
        self.last_fired: float | None = None
        self.initial: dict[str, Any] = {}
        self.previous: dict[int, Any] = {}  # id(Changed node) -> value or {key: value}
        self.rates: dict[tuple[int, Any], tuple[float, float, float]] = {}  # (id(Rate), key) -> (t, value, rate)
        self.errors = 0

    def _initials(self) -> Iterator[str]:
        def walk(node: Any) -> Iterator[str]:
            if isinstance(node, InitialRef):
                yield node.initial
            elif isinstance(node, BaseModel):
                for name in type(node).model_fields:
                    yield from walk(getattr(node, name))
            elif isinstance(node, list | tuple):
                for item in node:
                    yield from walk(item)

        yield from walk(self.rule.when.condition)
        for v in self.rule.do.params().values():
            yield from walk(v)

    def record_initials(self, body: BaseModel) -> None:
        for name in self._initials():
            if name not in self.initial:
                try:
                    self.initial[name] = _get_body(body, name)
                except _Missing:
                    pass

    # values -------------------------------------------------------------------------------
    def value(self, node: Any, ev: _Event, rows: bool, row: int | None = None) -> Any:
        if isinstance(node, FieldRef):
            name = node.field
            if name in ev.arrays and (rows or row is not None):
                col = np.asarray(ev.arrays[name])
                return col if row is None else col[row].item()
            return _get_body(ev.body, name)
        if isinstance(node, InitialRef):
            if node.initial not in self.initial:
                raise _Missing(node.initial)
            return self.initial[node.initial]
        if isinstance(node, ContextRef):
            if ev.context is None:
                raise _Missing(node.context)
            if node.context in ("frame_stage_x_um", "frame_stage_y_um"):
                position = ev.context.stage_at_frame(ev.t_acquired)
                if position is None:
                    raise _Missing(node.context)
                return position[0 if node.context == "frame_stage_x_um" else 1]
            return ev.context.get(node.context)
        if isinstance(node, Rate):
            return self._rate(node, ev, rows, row)
        if isinstance(node, Add):
            out = self.value(node.add[0], ev, rows, row)
            for v in node.add[1:]:
                out = out + self.value(v, ev, rows, row)
            return out
        if isinstance(node, Mul):
            out = self.value(node.mul[0], ev, rows, row)
            for v in node.mul[1:]:
                out = out * self.value(v, ev, rows, row)
            return out
        if isinstance(node, Sub):
            return self.value(node.sub[0], ev, rows, row) - self.value(node.sub[1], ev, rows, row)
        if isinstance(node, Div):
            den = self.value(node.div[1], ev, rows, row)
            with np.errstate(divide="ignore", invalid="ignore"):
                return self.value(node.div[0], ev, rows, row) / den
        return node

    def _rate(self, node: Rate, ev: _Event, rows: bool, row: int | None) -> float:
        if ev.t_acquired is None:
            raise _Missing("rate (the event has no acquisition time)")
        current = float(self.value(node.rate, ev, rows, row))
        key = None if node.key is None else self.value(FieldRef(field=node.key), ev, rows, row)
        if isinstance(key, np.generic):
            key = key.item()
        slot = (id(node), key)
        previous = self.rates.get(slot)
        rate = 0.0
        if previous is not None and ev.t_acquired > previous[0]:
            sample = (current - previous[1]) / (ev.t_acquired - previous[0])
            rate = node.smoothing * sample + (1.0 - node.smoothing) * previous[2]
        elif previous is not None:
            rate = previous[2]
        if len(self.rates) > 4096:  # keys (particles) come and go: forget the oldest
            for old in list(self.rates)[:1024]:
                del self.rates[old]
        self.rates[slot] = (ev.t_acquired, current, rate)
        return rate

    # conditions ---------------------------------------------------------------------------
    def condition(self, node: Any, ev: _Event, rows: bool) -> Any:
        """bool (event scope) or a boolean array over rows (row scope). Evaluates every branch
        (no short cut) so that changed-value memories stay current."""
        if isinstance(node, Compare):
            a = self.value(FieldRef(field=node.field), ev, rows)
            b = self.value(node.value, ev, rows)
            try:
                return _OPS[node.op](a, b)
            except TypeError:
                return False if not rows else np.zeros(ev.n_rows, dtype=bool)
        if isinstance(node, AllOf | AnyOf):
            parts = [self._safe(c, ev, rows) for c in (node.all if isinstance(node, AllOf) else node.any)]
            if rows:
                arr = np.array([np.broadcast_to(p, (ev.n_rows,)) for p in parts], dtype=bool)
                return arr.all(axis=0) if isinstance(node, AllOf) else arr.any(axis=0)
            return all(bool(p) for p in parts) if isinstance(node, AllOf) else any(bool(p) for p in parts)
        if isinstance(node, Not):
            inner = self._safe(node.not_, ev, rows)
            return ~np.asarray(inner, dtype=bool) if rows else not bool(inner)
        if isinstance(node, Changed):
            return self._changed(node, ev, rows)
        if isinstance(node, AnyRow | AllRows):
            inner = node.any_row if isinstance(node, AnyRow) else node.all_rows
            mask = np.broadcast_to(np.asarray(self._safe(inner, ev, True), dtype=bool), (ev.n_rows,))
            return mask
        raise TypeError(f"not a condition: {node!r}")  # pragma: no cover

    def _safe(self, node: Any, ev: _Event, rows: bool) -> Any:
        try:
            return self.condition(node, ev, rows)
        except _Missing:
            return np.zeros(ev.n_rows, dtype=bool) if rows else False

    def _changed(self, node: Changed, ev: _Event, rows: bool) -> Any:
        current = self.value(FieldRef(field=node.changed), ev, rows)
        to = None if node.to is None else self.value(node.to, ev, rows)
        frm = None if node.from_ is None else self.value(node.from_, ev, rows)
        memory = self.previous.setdefault(id(node), {})
        if node.key is None and not rows:
            keys: list[Any] = [None]
            values = [current]
        else:
            key_values = self.value(FieldRef(field=node.key), ev, rows) if node.key is not None else np.arange(ev.n_rows)
            keys = list(np.atleast_1d(key_values).tolist())
            values = list(np.broadcast_to(np.asarray(current, dtype=object), (len(keys),)))
        out = []
        for k, v in zip(keys, values, strict=True):
            missing = k not in memory
            prev = memory.get(k)
            memory[k] = v
            if missing:
                hit = to is not None and _eq(v, to) and frm is None
            else:
                hit = not _eq(prev, v) and (to is None or _eq(v, to)) and (frm is None or _eq(prev, frm))
            out.append(hit)
        if node.key is None and not rows:
            return out[0]
        return np.array(out, dtype=bool)

    def matches(self, ev: _Event) -> tuple[bool, np.ndarray | None]:
        """Whether the rule's condition holds, and the matching rows if it is a row condition."""
        cond = self.rule.when.condition
        if cond is None:
            return True, None
        try:
            result = self.condition(cond, ev, rows=False)
        except _Missing:
            return False, None
        if isinstance(result, np.ndarray):
            rows = np.flatnonzero(result)
            if isinstance(cond, AllRows):
                return bool(result.all()) and result.size > 0, rows
            return rows.size > 0, rows
        return bool(result), None


def _eq(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except (TypeError, ValueError):
        return False


def _pick(rule: RuleConfig, ev: _Event, rows: np.ndarray) -> int:
    if rule.pick == "first" or rows.size == 1:
        return int(rows[0])
    if rule.pick == "nearest_centre":
        if ev.context is None:
            return int(rows[0])
        x = np.asarray(ev.arrays["x"], dtype=np.float64)[rows]
        y = np.asarray(ev.arrays["y"], dtype=np.float64)[rows]
        d2 = (x - ev.context.get("centre_x_px")) ** 2 + (y - ev.context.get("centre_y_px")) ** 2
        return int(rows[int(np.argmin(d2))])
    assert isinstance(rule.pick, PickBy)
    column = np.asarray(ev.arrays[rule.pick.max or rule.pick.min or ""], dtype=np.float64)[rows]
    return int(rows[int(np.nanargmax(column) if rule.pick.max else np.nanargmin(column))])


@dataclass
class RuleFiring:
    """One firing: the rule, the request it built (or the error), and when it matched."""

    rule: str
    params: dict[str, Any]
    t_matched: float
    error: str | None = None
    request: Any = None


class RuleEngine:
    """Evaluates the rules of one run over events (no threads; :class:`RulesSink` feeds it)."""

    def __init__(self, rules: Sequence[RuleConfig], context: Callable[[], FieldOfView | None] = lambda: None) -> None:
        active = [r for r in rules if r.enabled]
        order = sorted(range(len(active)), key=lambda i: (active[i].do.action != "stop_acquisition", -active[i].priority, i))
        self.states = [RuleState(active[i]) for i in order]
        self.topics = frozenset(r.when.topic for r in active)
        self._context = context

    def evaluate(
        self, topic: str, body: BaseModel, arrays: Mapping[str, np.ndarray], now: float | None = None,
        t_acquired: float | None = None,
    ) -> list[RuleFiring]:
        """The firings this event causes, in order (stop first). Updates cooldowns and counts.
        ``t_acquired``: the triggering frame's acquisition time (rates, frame-stage context)."""
        now = time.monotonic() if now is None else now
        # When the rules matched, on the wall clock, read with the cooldown's clock: firings are
        # then at least cooldown_s apart in t_matched too (a later read per rule added the
        # varying time spent matching, so two t_matched could be closer than the cooldown).
        t_matched = time.time()
        n_rows = 0
        for column in ROW_COLUMNS.get(topic, ()):
            if column in arrays:
                n_rows = int(np.asarray(arrays[column]).shape[0])
                break
        labels = getattr(body, "labels", None)
        if isinstance(labels, Mapping) and labels:  # coded columns (docs/events.md): compare by name
            arrays = dict(arrays)
            for column, names in labels.items():
                if column in arrays:
                    arrays[column] = np.asarray(names, dtype=object)[np.asarray(arrays[column], dtype=np.intp)]
        ev = _Event(body, arrays, n_rows, self._context(), t_acquired)
        firings = []
        for st in self.states:
            rule = st.rule
            if rule.when.topic != topic:
                continue
            st.record_initials(body)
            matched, rows = st.matches(ev)
            if not matched:
                continue
            if rule.max_firings is not None and st.firings >= rule.max_firings:
                continue
            if st.last_fired is not None and now - st.last_fired < rule.cooldown_s:
                continue
            st.firings += 1
            st.last_fired = now
            row = _pick(rule, ev, rows) if rows is not None and rows.size else None
            try:
                params = {name: self._param(st, v, ev, row) for name, v in rule.do.params().items()}
            except _Missing as exc:
                firings.append(RuleFiring(rule.name, {}, t_matched, error=f"rule {rule.name!r}: the event has no value for {exc.args[0]!r}"))
                continue
            data = {"action": rule.do.action, **params}
            try:
                request = parse_action(data)
            except ActionError as exc:
                firings.append(RuleFiring(rule.name, data, t_matched, error=f"rule {rule.name!r}: {exc}"))
                continue
            firings.append(RuleFiring(rule.name, data, t_matched, request=request))
        return firings

    def _param(self, st: RuleState, value: Any, ev: _Event, row: int | None) -> Any:
        if not isinstance(value, BaseModel):
            return value
        out = st.value(value, ev, rows=False, row=row)
        if isinstance(out, np.generic):
            out = out.item()
        if isinstance(out, float) and not math.isfinite(out):
            return out  # parse_action names it
        return out


# -- the sink --------------------------------------------------------------------------------


@dataclass
class RulesCounters:
    events_seen: int = 0
    events_dropped: int = 0
    firings: int = 0
    by_rule: dict[str, int] = field(default_factory=dict)


class RulesSink:
    """Runs the rules on its own thread, fed by a small queue; never blocks the publisher.

    Implements the engine's Sink role (``handle(envelope)``, ``close()``). Only events of topics
    some rule looks at are queued; when the queue is full the oldest event is dropped (a control
    loop wants the newest) and counted.

    Parameters
    ----------
    rules
        The ``rules`` section.
    service
        Carries the actions out and publishes them.
    context
        Returns the run's :class:`FieldOfView` once the source is open (None before).
    capacity_events
        Queue length.
    """

    def __init__(
        self,
        rules: Sequence[RuleConfig],
        service: ActionService,
        context: Callable[[], FieldOfView | None] = lambda: None,
        capacity_events: int = 256,
    ) -> None:
        self.engine = RuleEngine(rules, context)
        self._service = service
        self._queue: deque[Envelope] = deque()
        self._capacity = capacity_events
        self._cv = threading.Condition()
        self._closing = False
        self.counters = RulesCounters()
        self._thread = threading.Thread(target=self._run, name="scopestream-rules", daemon=True)
        self._thread.start()

    @property
    def topics(self) -> frozenset[str]:
        return self.engine.topics

    def handle(self, envelope: Envelope) -> None:
        if envelope.topic not in self.engine.topics:
            return
        with self._cv:
            if len(self._queue) >= self._capacity:
                self._queue.popleft()
                self.counters.events_dropped += 1
            self._queue.append(envelope)
            self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._queue and not self._closing:
                    self._cv.wait()
                if not self._queue:
                    return
                env = self._queue.popleft()
            try:
                self._process(env)
            except Exception:  # noqa: BLE001 - a rule must never end the daemon
                log.exception("rules failed on %s seq %d", env.topic, env.seq)

    def _process(self, env: Envelope) -> None:
        self.counters.events_seen += 1
        if self._service.stopping():
            return  # stop always wins: nothing fires after it
        trigger = Trigger(env.topic, env.seq, env.frame_seq, env.t_acquired)
        for firing in self.engine.evaluate(env.topic, env.body, env.arrays, t_acquired=env.t_acquired):
            self.counters.firings += 1
            self.counters.by_rule[firing.rule] = self.counters.by_rule.get(firing.rule, 0) + 1
            if firing.request is None:
                self._service.refuse(
                    firing.params.get("action", "?"), firing.params, firing.error or "invalid",
                    origin="rule", requested_by=firing.rule, trigger=trigger,
                )
                continue
            self._service.execute(firing.request, origin="rule", requested_by=firing.rule, trigger=trigger,
                                  t_matched=firing.t_matched)
            if self._service.stopping():
                return


__all__ = [
    "ACTIONS",
    "ROW_COLUMNS",
    "Condition",
    "RuleCheckError",
    "RuleConfig",
    "RuleEngine",
    "RulesSink",
    "FieldOfView",
    "Value",
    "check_rules",
]
