"""A cost profile: every constant that turns simulated events into cycles or time, each with
where it comes from (measured on a host, cited from a document, or assumed with a reason).

The profile is data, read from TOML::

    [profile]
    name = "default"
    description = "..."

    [values.dram_latency]
    value = 200
    unit = "cycles"
    source = "cited"          # measured | cited | assumed
    ref = "Intel Optimization Reference Manual, Table 2-..."
    doc = "load-to-use latency of a line served by DRAM"
    # measured values also carry: date, host, spread (IQR / median), samples

Keys are those of the shipped default profile (``default.toml``); a profile file may list only
some of them (a measured profile), and the rest come from its base (the default).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

from ..errors import ConfigError

SourceKind = Literal["measured", "cited", "assumed"]
SOURCE_KINDS: tuple[str, ...] = get_args(SourceKind)
_VALUE_FIELDS = {"value", "unit", "source", "ref", "doc", "date", "host", "spread", "samples"}
_REQUIRED = ("value", "unit", "source", "ref")


@dataclass(frozen=True, slots=True)
class Source:
    """Where a value comes from. ``ref``: for ``cited``, the document and its table, figure or
    section (with the figure quoted); for ``measured``, the method; for ``assumed``, why
    nothing better exists."""

    kind: SourceKind
    ref: str
    date: str | None = None
    host: str | None = None
    spread: float | None = None  # relative spread of the measurement, e.g. IQR / median
    samples: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in SOURCE_KINDS:
            raise ConfigError("source", f"{self.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
        if not self.ref.strip():
            raise ConfigError("ref", "a value needs a reference (document, method or reason)")


@dataclass(frozen=True, slots=True)
class CostValue:
    """One priced quantity: ``value`` in ``unit``, its source, and what it prices."""

    value: float
    unit: str
    source: Source
    doc: str = ""

    def __post_init__(self) -> None:
        if not math.isfinite(self.value) or self.value < 0:
            raise ConfigError("value", f"{self.value!r} is not a finite number >= 0")


@dataclass(frozen=True, slots=True)
class CostProfile:
    """A named set of :class:`CostValue` by key; ``profile[key]`` is the number."""

    name: str
    values: Mapping[str, CostValue]
    description: str = ""
    path: str | None = field(default=None, compare=False)  # the file it was loaded from

    def __post_init__(self) -> None:
        object.__setattr__(self, "values", MappingProxyType(dict(self.values)))

    # -- reading ------------------------------------------------------------------------------

    def __getitem__(self, key: str) -> float:
        try:
            return self.values[key].value
        except KeyError:
            raise ConfigError(key, f"not a value of cost profile {self.name!r}") from None

    def __contains__(self, key: object) -> bool:
        return key in self.values

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def cycles(self, key: str) -> int:
        """``profile[key]`` rounded to whole cycles (counters in the model are integers)."""
        return round(self[key])

    def as_rows(self) -> list[dict[str, Any]]:
        """One flat dict per value, in key order of the profile, for tables and JSON."""
        return [
            {
                "key": key,
                "value": v.value,
                "unit": v.unit,
                "source": v.source.kind,
                "ref": v.source.ref,
                "doc": v.doc,
                "date": v.source.date,
                "host": v.source.host,
                "spread": v.source.spread,
                "samples": v.source.samples,
            }
            for key, v in self.values.items()
        ]

    def summary(self) -> dict[str, Any]:
        """What a result records about the profile it ran with: name, file, and every value
        with its unit and source (reference, and for measured values date, host, spread)."""
        values = {}
        for row in self.as_rows():
            key = row.pop("key")
            values[key] = {k: v for k, v in row.items() if v is not None and k != "doc"}
        return {"name": self.name, "path": self.path, "values": values}

    def sources(self) -> dict[str, int]:
        """How many values come from each kind of source."""
        counts = dict.fromkeys(SOURCE_KINDS, 0)
        for v in self.values.values():
            counts[v.source.kind] += 1
        return counts

    # -- deriving -----------------------------------------------------------------------------

    def with_values(
        self, values: Mapping[str, CostValue], *, name: str | None = None
    ) -> CostProfile:
        """This profile with ``values`` replacing (or adding) some keys; the rest are kept."""
        merged = dict(self.values)
        merged.update(values)
        return replace(self, name=name or self.name, values=merged)

    def merge(self, other: CostProfile) -> CostProfile:
        """``other``'s values over this profile's, under ``other``'s name."""
        return replace(
            self.with_values(other.values, name=other.name),
            description=other.description or self.description,
            path=other.path,
        )

    # -- files --------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> CostProfile:
        """The shipped profile (``default.toml``): cited values, assumed ones with a reason."""
        return _default()

    @classmethod
    def load(cls, path: str | Path, *, base: CostProfile | None = None) -> CostProfile:
        """Read a TOML profile. Its keys must be keys of ``base`` (the default profile unless
        given), with the same unit; keys it does not list keep ``base``'s values."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(str(path), f"cannot read the profile: {exc.strerror}") from None
        base = _default() if base is None else base
        return base.merge(cls.from_toml(text, origin=str(path), known=base))

    @classmethod
    def from_toml(
        cls, text: str, *, origin: str = "<profile>", known: CostProfile | None = None
    ) -> CostProfile:
        """Parse a profile; with ``known``, refuse keys it lacks and units that differ."""
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(origin, f"malformed TOML: {exc}") from None
        return _from_dict(data, origin, known)

    def to_toml(self) -> str:
        """The TOML text :meth:`from_toml` reads back to an equal profile."""
        lines = ["[profile]", f"name = {_q(self.name)}"]
        if self.description:
            lines.append(f"description = {_q(self.description)}")
        for key, v in self.values.items():
            lines += ["", f"[values.{key}]", f"value = {_num(v.value)}", f"unit = {_q(v.unit)}"]
            lines += [f"source = {_q(v.source.kind)}", f"ref = {_q(v.source.ref)}"]
            if v.doc:
                lines.append(f"doc = {_q(v.doc)}")
            for name in ("date", "host", "spread", "samples"):
                extra = getattr(v.source, name)
                if extra is not None:
                    lines.append(f"{name} = {_q(extra) if isinstance(extra, str) else _num(extra)}")
        return "\n".join(lines) + "\n"


def _q(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)  # a JSON string is a TOML basic string


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 2**53 else repr(float(x))


def _from_dict(data: dict[str, Any], origin: str, known: CostProfile | None) -> CostProfile:
    head = data.get("profile")
    if not isinstance(head, dict) or not isinstance(head.get("name"), str):
        raise ConfigError(f"{origin}: profile.name", 'a profile needs [profile] name = "..."')
    extra = set(data) - {"profile", "values"}
    if extra:
        raise ConfigError(
            f"{origin}: {sorted(extra)[0]}", "unknown table (expected profile, values)"
        )
    table = data.get("values", {})
    if not isinstance(table, dict):
        raise ConfigError(f"{origin}: values", "must be a table of [values.KEY] tables")
    values = {key: _value(origin, key, entry, known) for key, entry in table.items()}
    return CostProfile(
        name=head["name"],
        values=values,
        description=str(head.get("description", "")),
        path=origin,
    )


def _value(origin: str, key: str, entry: object, known: CostProfile | None) -> CostValue:
    where = f"{origin}: values.{key}"
    if known is not None and key not in known.values:
        raise ConfigError(where, f"unknown key (known: {', '.join(sorted(known.values))})")
    if not isinstance(entry, dict):
        raise ConfigError(where, "must be a table with value, unit, source, ref")
    missing = [name for name in _REQUIRED if name not in entry]
    if missing:
        raise ConfigError(where, f"missing {', '.join(missing)} (every value needs a source)")
    unknown = set(entry) - _VALUE_FIELDS
    if unknown:
        raise ConfigError(f"{where}.{sorted(unknown)[0]}", "unknown field")
    value = entry["value"]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where}.value", f"{value!r} is not a number")
    if known is not None and entry["unit"] != known.values[key].unit:
        raise ConfigError(
            f"{where}.unit", f"{entry['unit']!r} differs from {known.values[key].unit!r}"
        )
    try:
        source = Source(
            kind=cast(SourceKind, entry["source"]),
            ref=str(entry["ref"]),
            date=_opt(entry, "date", str),
            host=_opt(entry, "host", str),
            spread=_opt(entry, "spread", float),
            samples=_opt(entry, "samples", int),
        )
        return CostValue(float(value), str(entry["unit"]), source, str(entry.get("doc", "")))
    except ConfigError as exc:
        raise ConfigError(f"{where}.{exc.field}", str(exc).split(": ", 1)[1]) from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(where, str(exc)) from None


def _opt(entry: dict[str, Any], name: str, kind: type) -> Any:
    value = entry.get(name)
    if value is None:
        return None
    if kind is str and isinstance(value, str):
        return value
    if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    raise ConfigError(name, f"{value!r} is not a {kind.__name__}")


_DEFAULT: list[CostProfile] = []


def _default() -> CostProfile:
    if not _DEFAULT:
        text = resources.files("eptlab.costs").joinpath("default.toml").read_text()
        _DEFAULT.append(CostProfile.from_toml(text, origin="eptlab/costs/default.toml"))
    return _DEFAULT[0]
