"""The valid range of every flow parameter, checked in preflight before anything changes.

Each parameter name means the same thing in every flow, so one table states its range. A flow's
preflight calls :func:`check_parameters` first; a refusal names each parameter, the value given and
what was expected. Parameters typed as ``bool`` or as a ``Literal`` need no entry: their range is
their type; a structured parameter (a model, or a list of up to 100 of them) is checked by its
model. ``None`` is accepted exactly where the flow's signature admits it.

Example:
    >>> from runbook.parameters import bound_for
    >>> bound_for("approval_poll_seconds").expected
    'a number of seconds from 0.1 to 60'
"""

from __future__ import annotations

import inspect
import math
import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Iterable, Literal, Mapping

from prefect import Flow
from prefect.exceptions import ParameterTypeError
from pydantic import BaseModel, ValidationError

from blocks.errors import InvalidInput
from blocks.kubernetes import DUMPABLE


class Bound:
    """A stated valid range: ``expected`` says it in words, ``problem`` finds a value outside it."""

    expected: str = ""

    def problem(self, value: Any) -> str | None:  # pragma: no cover - every bound overrides it
        raise NotImplementedError


def _show(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclass(frozen=True)
class Number(Bound):
    low: float
    high: float
    integer: bool = False
    unit: str = ""

    @property
    def expected(self) -> str:
        kind = "an integer" if self.integer else "a number"
        unit = f" of {self.unit}" if self.unit else ""
        return f"{kind}{unit} from {_num(self.low)} to {_num(self.high)}"

    def problem(self, value: Any) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "not a number"
        if self.integer and not isinstance(value, int):
            return "not an integer"
        if not math.isfinite(value):
            return "not finite"
        if not self.low <= value <= self.high:
            return "out of range"
        return None


@dataclass(frozen=True)
class Text(Bound):
    pattern: str
    expected: str
    max_length: int = 200

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, str):
            return "not text"
        if len(value) > self.max_length:
            return f"longer than {self.max_length} characters"
        # fullmatch: '$' would accept a trailing newline.
        if re.fullmatch(self.pattern, value) is None:
            return "malformed"
        return None


@dataclass(frozen=True)
class Choice(Bound):
    values: tuple

    @property
    def expected(self) -> str:
        return "one of " + ", ".join(repr(v) for v in self.values)

    def problem(self, value: Any) -> str | None:
        return None if value in self.values else "not a known value"


@dataclass(frozen=True)
class Flag(Bound):
    expected: str = "true or false"

    def problem(self, value: Any) -> str | None:
        return None if isinstance(value, bool) else "not a boolean"


@dataclass(frozen=True)
class Moment(Bound):
    """A time with a UTC offset, not in the future, not older than ``max_age_days``."""

    max_age_days: int = 366

    @property
    def expected(self) -> str:
        return f"a time with a UTC offset, not in the future and at most {self.max_age_days} days ago"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, datetime):
            return "not a time"
        if value.tzinfo is None or value.utcoffset() is None:
            return "naive (no time zone)"
        now = datetime.now(timezone.utc)
        if value > now:
            return f"in the future (now {now.isoformat()})"
        if now - value > timedelta(days=self.max_age_days):
            return "too old"
        return None


@dataclass(frozen=True)
class Items(Bound):
    each: Bound
    max_items: int
    unique: bool = True

    @property
    def expected(self) -> str:
        return f"a list of at most {self.max_items}{' distinct' if self.unique else ''} items, each {self.each.expected}"

    def problem(self, value: Any) -> str | None:
        if not isinstance(value, (list, tuple)):
            return "not a list"
        if len(value) > self.max_items:
            return f"{len(value)} items"
        for index, item in enumerate(value):
            trouble = self.each.problem(item)
            if trouble:
                return f"item {index} {_show(item)}: {trouble}"
        if self.unique:
            keys = [item.model_dump_json() if isinstance(item, BaseModel) else repr(item) for item in value]
            if len(set(keys)) != len(keys):
                return "has duplicates"
        return None


@dataclass(frozen=True)
class Model(Bound):
    """A structured value validated by its model; its text fields must not carry control characters."""

    model: type[BaseModel]

    @property
    def expected(self) -> str:
        return f"a valid {self.model.__name__}"

    def problem(self, value: Any) -> str | None:
        try:
            parsed = value if isinstance(value, self.model) else self.model.model_validate(value)
        except ValidationError as exc:
            first = exc.errors()[0]
            return f"invalid at {'.'.join(str(p) for p in first['loc'])}: {first['msg']}"
        for name, field_value in parsed:
            texts = field_value if isinstance(field_value, (list, tuple)) else [field_value]
            for text in texts:
                if isinstance(text, str) and _CONTROL.search(text.replace("\n", "").replace("\t", "")):
                    return f"field {name} holds control characters"
        return None


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# Non-blank text without control characters.
NONBLANK = r"[^\x00-\x1f\x7f]*[^\s\x00-\x1f\x7f][^\x00-\x1f\x7f]*"

# Prefect block document names: lowercase letters, digits and dashes.
BLOCK_NAME = Text(r"[a-z0-9][a-z0-9-]{0,99}", "a Prefect block name (lowercase letters, digits, dashes)", 100)
# Kubernetes object names (DNS-1123 subdomain).
KUBE_NAME = Text(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?", "a Kubernetes object name (DNS-1123: lowercase, digits, '-', '.')", 253)
KUBE_KEY = Text(r"[-._a-zA-Z0-9]{1,253}", "a Kubernetes Secret key (letters, digits, '-', '_', '.')", 253)
LABEL_KEY = Text(r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?",
                 "a Kubernetes label key", 317)
PERSON = Text(NONBLANK, "a name without control characters", 100)
PLAIN = Text(NONBLANK, "non-blank text without control characters", 200)
IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_$]{0,62}"
TABLE = Text(rf"{IDENTIFIER}(\.{IDENTIFIER})?", "a table name, optionally schema-qualified (schema.table)", 127)
SQL = Text(r"(?s)[^\x00]*\S[^\x00]*", "one non-blank SQL statement", 10_000)
URL = Text(r"https?://[^\s\x00-\x1f\x7f]+", "an http(s) URL", 2000)
SECONDS = "seconds"


def _seconds(low: float, high: float, integer: bool = False) -> Number:
    return Number(low, high, integer=integer, unit=SECONDS)


BOUNDS: dict[str, Bound] = {
    # What to recover: blocks that describe the estate.
    **{name: BLOCK_NAME for name in (
        "cluster_block", "cache_block", "kubernetes_block", "kube_block", "health_block", "registry_block",
        "store_block", "qdrant_block", "postgres_block", "secrets_block", "evidence_block", "iam_block",
        "quarantine_block", "sources_block", "objectives_block", "primary_region", "dr_region", "dns_zone",
        "kubernetes_target",
    )},
    "notifier": Text(r"[a-z0-9][a-z0-9-]{0,99}/[a-z0-9][a-z0-9-]{0,99}",
                     "a notification block as '<block-type-slug>/<block-name>'", 201),
    "severity": Text(r"(?i)(P[0-3]|sev-? ?[1-4])", "P0, P1, P2 or P3 (or Sev1-Sev4, Sev1 = P0)", 6),
    "business_function": Text(r"[a-z0-9][a-z0-9-]{0,62}", "a business function of the objectives (lowercase, digits, dashes)", 63),
    # When.
    "incident_detected_at": Moment(),
    "breach_started_at": Moment(),
    "restore_as_of": Moment(),
    "recovery_target": Text(NONBLANK,
                            "an ISO-8601 time with a UTC offset, or a restore point name", 100),
    "incident_id": Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}",
                        "an incident id: letters, digits, '.', '_', '-', starting with a letter or digit", 128),
    # Approval.
    "allowed_approvers": Items(PERSON, 50),
    "approval_timeout_seconds": _seconds(1, 7 * 86400, integer=True),
    "approval_poll_seconds": _seconds(0.1, 60),
    "lock_wait_seconds": _seconds(0, 3600, integer=True),
    # Waits and windows.
    "rollout_timeout_seconds": _seconds(1, 7200),
    "health_window_seconds": _seconds(0.1, 3600),
    "health_interval_seconds": _seconds(0.05, 300),
    "health_consecutive_required": Number(1, 100, integer=True),
    "health_failures": Number(1, 100, integer=True),
    "dns_ttl_seconds": _seconds(1, 86400, integer=True),
    "warmup_window_seconds": _seconds(0.1, 86400),
    "sample_interval_seconds": _seconds(0.05, 3600),
    # Databases.
    "row_count_tables": Items(TABLE, 200),
    "smoke_queries": Items(SQL, 100),
    "failed_port": Number(1, 65535, integer=True),
    "database_secret": KUBE_NAME,
    "database_secret_key": KUBE_KEY,
    # Kubernetes.
    "deployment": KUBE_NAME,
    "restart_deployments": Items(KUBE_NAME, 100),
    "serving_deployments": Items(KUBE_NAME, 100),
    "to_revision": Number(1, 2**31 - 1, integer=True),
    "health_urls": Items(URL, 50),
    "training_job_selector": Text(NONBLANK, "a label selector, e.g. 'app=trainer'", 1000),
    "secret_name": KUBE_NAME,
    "secret_key": KUBE_KEY,
    "bucket_key": KUBE_KEY,
    "kubernetes_kinds": Items(Choice(tuple(sorted(DUMPABLE))), len(DUMPABLE)),
    "workload_label": LABEL_KEY,
    "network_policy_prefix": Text(r"[a-z0-9]([-a-z0-9]{0,38}[a-z0-9])?", "a Kubernetes name prefix of at most 40 characters", 40),
    # Security.
    "evidence_retention_days": Number(1, 36500, integer=True),
    "credential_prefix": Text(r"[A-Za-z0-9/_+=.@-]{1,256}", "a Secrets Manager name prefix (letters, digits, /_+=.@-)", 256),
    "secret_block_prefix": Text(r"[a-z0-9][a-z0-9-]{0,49}", "a Prefect block name prefix (lowercase letters, digits, dashes)", 50),
    # Cache.
    "target_hit_rate": Number(0, 1),
    "min_keys": Number(0, 10**9, integer=True),
    # Models and objects.
    "model": PLAIN,
    "version": PLAIN,
    "prefix": Text(r"[^\x00-\x1f\x7f]*", "an object key prefix (may be empty)", 1024),
    "verify_sample": Number(0, 100_000, integer=True),
    "max_workers": Number(1, 64, integer=True),
    # Vector DB.
    "alias": Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", "a Qdrant alias name (letters, digits, '.', '_', '-')", 255),
    "collection": Text(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}", "a Qdrant collection name (letters, digits, '.', '_', '-')", 255),
    "backup_key": Text(NONBLANK, "an object key", 1024),
    "distance": Choice(("Cosine", "Dot", "Euclid", "Manhattan")),
    "sample_queries": Number(1, 10_000, integer=True),
    "min_recall": Number(0, 1),
    "k": Number(1, 1000, integer=True),
    "batch_size": Number(1, 100_000, integer=True),
    # Drills.
    "scenario": Text(r"[a-z0-9][a-z0-9-]{0,62}", "a drill name, or 'all'", 63),
    "rows": Number(1000, 100_000_000, integer=True),
}


def _hints(fn: Callable) -> dict[str, Any]:
    return typing.get_type_hints(fn, include_extras=False)


def _union_args(hint: Any) -> tuple:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def bound_for(name: str, hint: Any = None) -> Bound:
    """The stated range of parameter ``name`` (of type ``hint``); KeyError if it has none."""
    if name in BOUNDS:
        return BOUNDS[name]
    for arg in _union_args(hint):
        if arg is bool:
            return Flag()
        if typing.get_origin(arg) is Literal:
            return Choice(typing.get_args(arg))
        if inspect.isclass(arg) and issubclass(arg, BaseModel):
            return Model(arg)
        item = typing.get_args(arg)[0] if typing.get_origin(arg) is list and typing.get_args(arg) else None
        if inspect.isclass(item) and issubclass(item, BaseModel):
            return Items(Model(item), 100)
    raise KeyError(name)


def admits_none(hint: Any) -> bool:
    return any(arg is type(None) for arg in _union_args(hint))


def _function(flow_or_fn: Any) -> Callable:
    return getattr(flow_or_fn, "fn", flow_or_fn)


def parameter_bounds(flow_or_fn: Any) -> dict[str, tuple[Bound, bool]]:
    """Every parameter of a flow with its bound and whether None is accepted."""
    fn = _function(flow_or_fn)
    hints = _hints(fn)
    result = {}
    for name in inspect.signature(fn).parameters:
        hint = hints.get(name)
        result[name] = (bound_for(name, hint), admits_none(hint))
    return result


def problems(flow_or_fn: Any, values: Mapping[str, Any]) -> list[str]:
    """What is wrong with ``values`` for this flow, one line per parameter outside its range."""
    found = []
    for name, (bound, none_ok) in parameter_bounds(flow_or_fn).items():
        if name not in values:
            continue
        value = values[name]
        if value is None:
            if not none_ok:
                found.append(f"{name}=None (not given); expected {bound.expected}")
            continue
        trouble = bound.problem(value)
        if trouble:
            found.append(f"{name}={_show(value)} ({trouble}); expected {bound.expected}")
    return found


def check_parameters(flow_or_fn: Any = None, values: Mapping[str, Any] | None = None) -> None:
    """Refuse parameters outside their stated range, before anything changes.

    Without arguments, checks the running flow's own parameters (defaults included).

    Raises:
        InvalidInput: naming every parameter out of range, the value and what was expected.
    """
    if flow_or_fn is None or values is None:
        from prefect.context import FlowRunContext

        ctx = FlowRunContext.get()
        if ctx is None:
            raise RuntimeError("check_parameters() without arguments must run inside a flow run")
        flow_or_fn, values = ctx.flow, {**_defaults(ctx.flow), **(ctx.parameters or {})}
    found = problems(flow_or_fn, values)
    if found:
        raise InvalidInput("invalid parameters, nothing was changed: " + "; ".join(found))


def _defaults(flow_or_fn: Any) -> dict[str, Any]:
    fn = _function(flow_or_fn)
    return {n: p.default for n, p in inspect.signature(fn).parameters.items() if p.default is not inspect.Parameter.empty}


def describe(flows: Iterable[Any]) -> str:
    """A markdown table of every parameter's range, for the README and `dr params`."""
    lines = ["| flow | parameter | valid range |", "|---|---|---|"]
    for flow_obj in flows:
        label = getattr(flow_obj, "name", _function(flow_obj).__name__)
        for name, (bound, none_ok) in parameter_bounds(flow_obj).items():
            lines.append(f"| {label} | `{name}` | {bound.expected}{' (or empty)' if none_ok else ''} |")
    return "\n".join(lines) + "\n"


class CheckedFlow(Flow):
    """A flow whose parameters of the wrong type are refused naming the value given, not only the parameter."""

    def validate_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        try:
            return super().validate_parameters(parameters)
        except ParameterTypeError as exc:
            cause = exc.__context__
            if not isinstance(cause, ValidationError):
                raise
            found = []
            for error in cause.errors():
                name = ".".join(str(part) for part in error["loc"])
                shown = "(missing)" if error["type"] == "missing" else _show(error.get("input"))
                found.append(f"{name}={shown} ({error['msg']})")
            raise ParameterTypeError("invalid parameters, nothing was changed: " + "; ".join(found)) from None

    def with_options(self, *args: Any, **kwargs: Any) -> "CheckedFlow":
        copy = super().with_options(*args, **kwargs)
        copy.__class__ = type(self)
        return copy


def recovery_flow(**options: Any) -> Callable[[Callable], CheckedFlow]:
    """``@flow`` for the project's flows: Prefect's flow whose refused parameters name their values."""

    def decorate(fn: Callable) -> CheckedFlow:
        return CheckedFlow(fn=fn, **options)

    return decorate
