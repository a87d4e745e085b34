"""Load a Kazoo-style ``config.ini``.

Brokers come from ``[zone:NAME]`` sections (or Kazoo's ``[zone]`` with ``name =``), each with
repeated ``uri =`` / ``amqp_uri =`` lines, or else from one ``[amqp]`` section whose zone is
named ``local``.  ``[pool]`` holds the settings declared in :mod:`kzpool.common.settings`.

Every fault is collected and raised at once as :class:`~kzpool.common.errors.ConfigError`, one line
per fault, naming the file, the line, the key and the bad value.  Passwords are masked.

TLS files (an ``amqps`` URI's options, the ``[pool] tls_*`` defaults) are loaded here, so a
missing file, a file that is not PEM, an encrypted key without its password or a key that
does not match its certificate is a fault of the config (``kzpool check``, ``serve``,
``SIGHUP``), not of a worker.  Loading reads the files: :func:`loads` blocks on the file
system when the config names any.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from . import tls
from .errors import BrokerURIError, ConfigError, TLSError
from .settings import (
    BY_NAME,
    CONSUMER_BY_NAME,
    SETTINGS,
    ConsumerSettings,
    PoolSettings,
    Setting,
)
from .uri import BrokerURI, mask

URI_KEYS = ("uri", "amqp_uri")
LOCAL = "local"


@dataclass
class Entry:
    key: str
    value: str
    line: int


@dataclass
class Section:
    name: str
    line: int
    entries: list[Entry] = field(default_factory=list)


def parse_ini(text: str, path: str, problems: list[str]) -> list[Section]:
    """Split ini text into sections, keeping repeated keys and line numbers."""
    sections: list[Section] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped[0] in ";#":
            continue
        if raw[0].isspace() and sections and sections[-1].entries:
            last = sections[-1].entries[-1]
            last.value = f"{last.value}\n{_clean(stripped)}"
        elif stripped.startswith("["):
            if not stripped.endswith("]") or len(stripped) < 3:
                problems.append(f"{path}:{number}: bad section header {stripped!r}")
                continue
            sections.append(Section(stripped[1:-1].strip(), number))
        elif "=" in stripped and sections:
            key, _, value = stripped.partition("=")
            sections[-1].entries.append(Entry(key.strip(), _clean(value), number))
        elif not sections:
            problems.append(f"{path}:{number}: {stripped!r} stands before any [section]")
        else:
            problems.append(f"{path}:{number}: expected 'key = value', got {mask(stripped)!r}")
    return sections


def _clean(value: str) -> str:
    """Drop an inline comment and Kazoo's optional double quotes."""
    for marker in (" ;", " #", "\t;", "\t#"):
        value = value.split(marker, 1)[0]
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        value = value[1:-1]
    return value


@dataclass(frozen=True)
class Broker:
    """A broker of the config: its URI, zone and place in config order."""

    uri: BrokerURI
    zone: str
    local: bool
    order: int
    hidden: bool = False  # added at run time for a sticky lease: never a primary


@dataclass(frozen=True)
class Consumer:
    """One ``[consumer:NAME]`` section."""

    name: str
    settings: ConsumerSettings


@dataclass(frozen=True)
class Config:
    path: str
    settings: PoolSettings
    local_zone: str
    brokers: tuple[Broker, ...]
    consumers: tuple[Consumer, ...] = ()

    @property
    def zones(self) -> list[str]:
        return list(dict.fromkeys(b.zone for b in self.brokers))

    @property
    def passwords(self) -> set[str]:
        """Every secret of the config: the brokers' passwords and their keys' passwords."""
        secrets = {b.uri.password for b in self.brokers if b.uri.password}
        return secrets | {p for b in self.brokers if (p := b.uri.option("password"))}


def load(path: str, overrides: Mapping[str, str] | None = None,
         environ: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``; ``overrides`` (setting name → text) come from CLI flags."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
    return loads(text, path, overrides, os.environ if environ is None else environ)


def loads(text: str, path: str = "<config>", overrides: Mapping[str, str] | None = None,
          environ: Mapping[str, str] | None = None) -> Config:
    problems: list[str] = []
    sections = parse_ini(text, path, problems)
    pool_entries = [e for s in sections if s.name == "pool" for e in s.entries]
    wheres: dict[str, str] = {}  # a setting's name, or a broker's short URI: where it was given
    settings = _settings(pool_entries, path, overrides or {}, environ or {}, problems, wheres)
    zones = _zones(sections, path, problems, wheres)
    _check_tls(settings, [u for uris in zones.values() for u in uris], wheres, problems)
    local = settings.zone or (next(iter(zones)) if len(zones) == 1 else None)
    if zones and local is None:
        problems.append(f"{path}: several zones ({', '.join(zones)}): name the local one with"
                        " [pool] zone = NAME or KZPOOL_ZONE")
    elif zones and local not in zones:
        problems.append(f"{path}: local zone {local!r} ([pool] zone or KZPOOL_ZONE) has no"
                        f" [zone:{local}] section; zones are: {', '.join(zones)}")
    consumers = _consumers(sections, path, problems)
    if problems:
        raise ConfigError(sorted(problems, key=_line_of))
    assert local is not None
    brokers = tuple(
        Broker(uri, zone, zone == local, order)
        for order, (zone, uri) in enumerate((z, u) for z, uris in zones.items() for u in uris)
    )
    return Config(path, settings, local, brokers, consumers)


def _consumers(sections: list[Section], path: str, problems: list[str]) -> tuple[Consumer, ...]:
    found: dict[str, Consumer] = {}
    for section in sections:
        if not section.name.startswith("consumer:"):
            continue
        name = section.name[9:].strip()
        where = f"{path}:{section.line}: [{section.name}]"
        if not name.replace("-", "_").isidentifier():
            problems.append(f"{where}: a consumer name is letters, digits, - and _")
            continue
        if name in found:
            problems.append(f"{where}: consumer {name!r} defined twice")
            continue
        values = _section_values(section, CONSUMER_BY_NAME, path, problems)
        values["queue"] = values["queue"] or name
        if values["handler"] is None and "handler" not in {e.key for e in section.entries}:
            problems.append(f"{where}: handler is required (module.path:callable)")
        if (values["lease"] == "sticky") != bool(values["broker"]):
            problems.append(f"{where}: a sticky consumer needs broker = URI, a float one none")
        elif values["broker"]:
            try:  # it is sent in a lease request: a broker URI as a client may give it
                BrokerURI.parse_client(values["broker"])
            except BrokerURIError as exc:
                problems.append(f"{where} broker: {exc.fields['reason']}")
        if values["federate"] and not (values["exchange"] and values["bindings"]):
            problems.append(f"{where}: federate = true needs an exchange and bindings to"
                            " consume on the other zones' brokers")
        found[name] = Consumer(name, ConsumerSettings(**values))
    return tuple(found.values())


def _section_values(section: Section, table: Mapping[str, Setting], path: str,
                    problems: list[str]) -> dict[str, Any]:
    """Values of one section against a settings table: every key known, every value valid."""
    given: dict[str, Entry] = {}
    for entry in section.entries:
        if entry.key not in table:
            problems.append(f"{path}:{entry.line}: [{section.name}] unknown key {entry.key!r}"
                            f" (known: {', '.join(table)})")
        elif entry.key in given:
            problems.append(f"{path}:{entry.line}: [{section.name}] {entry.key} given twice")
        else:
            given[entry.key] = entry
    values: dict[str, Any] = {}
    for name, setting in table.items():
        written = given.get(name)
        text = written.value if written else setting.default
        try:
            values[name] = None if text is None else setting.parse(text)
        except ValueError as exc:
            values[name] = None  # reported below; the other checks go on
            where = f"{path}:{written.line}: [{section.name}] {name}" if written else name
            problems.append(f"{where} = {text!r}: {exc}")
    return values


def _settings(entries: list[Entry], path: str, overrides: Mapping[str, str],
              environ: Mapping[str, str], problems: list[str],
              wheres: dict[str, str]) -> PoolSettings:
    given: dict[str, tuple[str | None, str]] = {}
    for entry in entries:
        if entry.key not in BY_NAME:
            known = ", ".join(BY_NAME)
            problems.append(f"{path}:{entry.line}: [pool] unknown key {entry.key!r}"
                            f" (known: {known})")
        elif entry.key in given:
            problems.append(f"{path}:{entry.line}: [pool] {entry.key} given twice")
        else:
            given[entry.key] = (entry.value, f"{path}:{entry.line}: [pool] {entry.key}")
    for setting in SETTINGS:
        if setting.env and environ.get(setting.env):
            given[setting.name] = (environ[setting.env], f"environment {setting.env}")
    for name, value in overrides.items():
        given[name] = (value, f"option {BY_NAME[name].flag}")
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        text, where = given.get(setting.name, (setting.default, "default"))
        wheres[setting.name] = where
        try:
            values[setting.name] = None if text is None else setting.parse(text)
        except ValueError as exc:
            values[setting.name] = None  # reported; the other checks go on
            problems.append(f"{where} = {text!r}: {exc}")
    return PoolSettings(**values)


def _zones(sections: list[Section], path: str, problems: list[str],
           wheres: dict[str, str]) -> dict[str, list[BrokerURI]]:
    zoned = [s for s in sections if s.name == "zone" or s.name.startswith("zone:")]
    flat = [s for s in sections if s.name == "amqp"]
    for section in sections:
        if section.name not in ("pool", "amqp", "zone") and not section.name.startswith(
                ("zone:", "consumer:")):
            problems.append(f"{path}:{section.line}: unknown section [{section.name}]"
                            " (known: [pool], [amqp], [zone:NAME], [consumer:NAME])")
    if zoned and flat:
        problems.append(f"{path}:{flat[0].line}: [amqp] and [zone] sections together;"
                        " use one or the other")
    zones: dict[str, list[BrokerURI]] = {}
    seen: dict[str, str] = {}
    for section in zoned or flat:
        name = _zone_name(section, path, problems)
        uris = zones.setdefault(name, [])
        for entry in section.entries:
            if entry.key == "name" and section.name == "zone":
                continue
            where = f"{path}:{entry.line}: [{section.name}] {entry.key}"
            if entry.key not in URI_KEYS:
                problems.append(f"{where}: unknown key (known: uri, amqp_uri)")
                continue
            try:
                uri = BrokerURI.parse(entry.value)
            except BrokerURIError as exc:
                problems.append(f"{where} = {mask(entry.value)!r}: {exc.fields['reason']}")
                continue
            if uri.short in seen:
                problems.append(f"{where} = {uri.masked!r}: broker already listed in"
                                f" {seen[uri.short]}")
                continue
            seen[uri.short] = where.split(": ", 1)[0]
            wheres[uri.short] = where
            uris.append(uri)
    if not zones:
        problems.append(f"{path}: no brokers: add an [amqp] section with uri = lines")
    for name, uris in zones.items():
        if not uris:
            problems.append(f"{path}: zone {name!r} lists no broker (uri = ...)")
    return zones


def _check_tls(settings: PoolSettings, uris: list[BrokerURI], wheres: Mapping[str, str],
               problems: list[str]) -> None:
    """Load every TLS file set the config names, once each; a fault of the [pool] defaults
    is named at the [pool] setting, one of a URI's own files at its uri line."""
    checked: set[tuple[str | None, ...]] = set()
    defaults = tls.pool_defaults(settings)
    if settings.tls_key and not settings.tls_cert:
        problems.append(f"{wheres['tls_key']} = {settings.tls_key!r}: tls_key needs tls_cert")
        checked.add(defaults.files)  # the URIs that use them are not checked again
    elif settings.tls_ca or settings.tls_cert:
        checked.add(defaults.files)
        try:
            tls.context(replace(defaults, verify=True))  # its CA too, whatever tls_verify
        except TLSError as exc:
            name = {"ca": "tls_ca", "cert": "tls_cert"}.get(str(exc.fields["part"]), "tls_key")
            if name == "tls_key" and not settings.tls_key:
                name = "tls_cert"
            problems.append(f"{wheres[name]} = {getattr(settings, name)!r}: {exc}")
    for uri in uris:
        files = tls.resolve(uri, settings)
        if files is None or files.files in checked:
            continue
        checked.add(files.files)
        try:
            tls.context(files)
        except TLSError as exc:
            from_pool = files.ca_from_pool if exc.fields["part"] == "ca" else (
                files.cert_from_pool)
            if not from_pool:  # else named at the [pool] setting already
                problems.append(f"{wheres[uri.short]} = {uri.masked!r}: {exc}")


def _zone_name(section: Section, path: str, problems: list[str]) -> str:
    if section.name == "amqp":
        return LOCAL
    if section.name.startswith("zone:"):
        name = section.name[5:].strip()
    else:
        name = next((e.value for e in section.entries if e.key == "name"), "")
    if not name:
        problems.append(f"{path}:{section.line}: [{section.name}] has no zone name")
    return name


def _line_of(problem: str) -> int:
    """Sort key: the line number a problem names, else 0."""
    parts = problem.split(":", 2)
    return int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else 0
