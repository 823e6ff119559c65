"""Search spaces for sweeps: config keys mapped to distributions, checked before anything runs.

A space file is YAML whose keys name config fields (dotted, or nested) and whose values
are one distribution each::

    optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    loss.params.beta: {choice: [20, 40, 50]}
    memory.size: {randint: [0, 4096]}       # [low, high): high excluded, as in Ray Tune
    memory.weight: {uniform: [0.5, 1.0]}

Every key must exist in the config schema (``loss.params.*`` must be a keyword of the
loss), and values the distribution can produce must be valid for the field: a sample is
applied to the plain config mapping and rebuilt with ``config_from_dict``, so the same
type checks as for a YAML file run on it. Errors name the key. Ray is imported only by
``to_tune``.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import itertools
import logging
import math
import random
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from dmlray.config import PRESET_DIR, Config, ConfigError, config_from_dict

log = logging.getLogger(__name__)

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice")


@dataclass(frozen=True)
class Param:
    """One swept config key and its distribution."""

    key: str
    """Dotted config key, e.g. ``optim.lr``."""
    kind: str
    """loguniform, uniform, randint or choice."""
    args: tuple
    """(low, high) for the ranges; the values for choice."""

    def examples(self) -> list:
        """Values this distribution can produce, as the trial will see them (typed)."""
        if self.kind == "choice":
            return list(self.args)
        low, high = self.args
        if self.kind == "randint":
            return [int(low), int(high) - 1]
        if self.kind == "loguniform":
            return [float(low), float(high), math.sqrt(low * high)]
        return [float(low), float(high), (low + high) / 2.0]

    def describe(self) -> str:
        return f"{self.key}: {self.kind} {list(self.args)}"


def _flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    """Nested mappings → dotted keys; a mapping with one distribution name is a leaf."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, dict) and not (len(value) == 1 and next(iter(value)) in DISTRIBUTIONS) and value:
            if any(k in DISTRIBUTIONS for k in value):
                out[where] = value  # a malformed distribution: reported by _param
            else:
                out.update(_flatten(value, where))
        else:
            out[where] = value
    return out


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _param(key: str, spec: Any) -> Param:
    """Parse one ``{kind: args}`` entry; impossible ranges are errors naming the key."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(
            f"{key}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}} "
            f"or {{choice: [a, b]}}; got {spec!r} (known: {', '.join(DISTRIBUTIONS)})"
        )
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise ConfigError(f"{key}: unknown distribution {kind!r}; known: {', '.join(DISTRIBUTIONS)}")
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{key}: choice needs a non-empty list of values, got {args!r}")
        return Param(key, kind, tuple(args))
    if not (isinstance(args, list) and len(args) == 2 and all(_number(a) for a in args)):
        raise ConfigError(f"{key}: {kind} needs [low, high] as two numbers, got {args!r}")
    low, high = args
    if not low < high:
        raise ConfigError(f"{key}: {kind} needs low < high, got [{low}, {high}]")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{key}: loguniform bounds must be > 0, got [{low}, {high}]")
    if kind == "randint" and not (isinstance(low, int) and isinstance(high, int)):
        raise ConfigError(f"{key}: randint bounds must be integers, got [{low}, {high}]")
    return Param(key, kind, (low, high))


def _field_type(key: str) -> Any:
    """The declared type of a dotted key in the Config schema (Any inside dict fields)."""
    cls: Any = Config
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            origin = typing.get_origin(cls)
            if origin is dict or cls is dict:
                return Any  # inside a free-form mapping (loss.params, model.backbone_args)
            raise ConfigError(f"unknown config key {key!r}: {'.'.join(parts[:i])} is not a section")
        names = {f.name: f for f in dataclasses.fields(cls)}
        if part not in names:
            where = ".".join(parts[:i]) or "config"
            raise ConfigError(f"unknown config key {key!r}; {where} has: {', '.join(sorted(names))}")
        cls = typing.get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(
            f"{key}: is a whole section; sweep one of its keys ({', '.join(f.name for f in dataclasses.fields(cls))})"
        )
    return cls


def set_key(data: dict, key: str, value: Any) -> dict:
    """A copy of a nested config mapping with ``key`` (dotted) set to a typed value.

    Values are set as Python objects, not re-parsed from text (``1e-05`` would be a
    string to YAML 1.1).
    """
    out = copy.deepcopy(data)
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part!r} is not a section")
    node[parts[-1]] = value
    return out


def apply_sample(base: dict, sample: dict[str, Any]) -> dict:
    """The config mapping with every sampled ``key: value`` set (checked by config_from_dict)."""
    out = base
    for key, value in sample.items():
        out = set_key(out, key, value)
    return out


def _check_loss_param(param: Param, base: dict) -> None:
    """``loss.params.X`` must be a keyword of the configured loss, and its values accepted by it."""
    from dmlray import losses

    section = base.get("loss") or {}
    name = section.get("name") or Config().loss.name
    try:
        cls = losses.loss_class(name)
    except Exception:  # an unknown loss is reported by config_from_dict
        return
    leaf = param.key.split(".")[2]
    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        known = [p for p in params if p != "self"]
        if leaf not in known:
            raise ConfigError(
                f"unknown config key {param.key!r}: loss {name!r} takes {', '.join(known) or 'no parameters'}"
            )
    if cls.needs_classes:
        return  # built with the dataset's class count: only the worker can
    for value in param.examples():
        try:
            losses.build(name, **{**(section.get("params") or {}), leaf: value})
        except Exception as exc:  # the loss's own checks: a wrong type or range
            raise ConfigError(f"{param.key}: loss {name!r} refuses {leaf}={value!r}: {exc}") from None


def parse_space(data: Any, base: dict | None = None) -> list[Param]:
    """Check a search space (a mapping) against the config schema and a base config mapping.

    Each key must name a config field, each distribution must be possible, and the values
    it can produce (bounds, a midpoint, every choice) must build a valid config together
    with ``base``. Raises ConfigError naming the key.
    """
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"search space: expected a mapping of config keys to distributions, got {data!r}")
    base = base or {}
    params = []
    for key, spec in _flatten(data).items():
        tp = _field_type(key)
        param = _param(key, spec)
        if key.startswith("loss.params.") and key.count(".") == 2:
            _check_loss_param(param, base)
        if param.kind in ("uniform", "loguniform") and tp is int:
            raise ConfigError(f"{key}: is an integer field; {param.kind} gives floats (use randint or choice)")
        for value in param.examples():
            try:
                config_from_dict(set_key(base, key, value))
            except ConfigError as exc:
                raise ConfigError(
                    f"{key}: {param.kind} {list(param.args)} can give {value!r}, which the config refuses: {exc}"
                ) from None
        params.append(param)
    check_combinations(params, base)
    return params


MAX_COMBINATIONS = 512
"""Trial configs built and validated when checking a space; beyond it, corners and a seeded sample."""


def combinations(params: list[Param], limit: int = MAX_COMBINATIONS, seed: int = 0) -> tuple[list[tuple], bool]:
    """Value combinations to check, and whether they are all of them.

    Each dimension contributes every choice, or a range's bounds and midpoint (what
    ``Param.examples`` gives). When the product exceeds ``limit``: the corners (each
    dimension at its first or last value; a seeded sample of them past ``limit // 2``)
    plus a seeded random sample of the rest. The check is then not exhaustive: it says so.
    """
    values = [p.examples() for p in params]
    total = math.prod(len(v) for v in values)
    if total <= limit:
        return list(itertools.product(*values)), True
    rng = random.Random(seed)
    ends = [(v[0], v[-1]) if len(v) > 1 else (v[0],) for v in values]
    picked: dict[str, tuple] = {}  # by repr: values may be unhashable (a list-valued choice)
    if math.prod(len(e) for e in ends) <= limit // 2:
        picked.update((repr(c), c) for c in itertools.product(*ends))
    else:
        picked.update((repr(c), c) for c in (tuple(rng.choice(e) for e in ends) for _ in range(limit // 2)))
    for _ in range(limit * 4):  # bounded: the sample may repeat itself
        if len(picked) >= limit:
            break
        combo = tuple(rng.choice(v) for v in values)
        picked[repr(combo)] = combo
    return list(picked.values()), False


def _check_loss_combination(cfg: Config, sample: dict[str, Any]) -> None:
    """Swept loss parameters must be accepted by the loss together (it may check them jointly)."""
    from dmlray import losses

    if not any(k.startswith("loss.params.") for k in sample) or losses.loss_class(cfg.loss.name).needs_classes:
        return
    try:
        losses.build(cfg.loss.name, **cfg.loss.params)
    except Exception as exc:  # the loss's own checks
        raise ConfigError(f"loss {cfg.loss.name!r} refuses params {cfg.loss.params}: {exc}") from None


def check_combinations(params: list[Param], base: dict) -> None:
    """Every trial config the space can produce must validate, not just each key alone (e.g.
    data.classes_per_batch and data.class_buffer swept together). Raises ConfigError naming
    the combination."""
    if len(params) < 2:
        return  # one key alone was checked by parse_space
    combos, exhaustive = combinations(params)
    if not exhaustive:
        log.info(
            "search space: %d keys give %d combinations; checked %d (corners and a seeded sample)",
            len(params),
            math.prod(len(p.examples()) for p in params),
            len(combos),
        )
    for combo in combos:
        sample = {p.key: v for p, v in zip(params, combo, strict=True)}
        try:
            _check_loss_combination(config_from_dict(apply_sample(base, sample)), sample)
        except ConfigError as exc:
            named = ", ".join(f"{k}={v!r}" for k, v in sample.items())
            raise ConfigError(
                f"search space: each key is valid alone, but the combination {named} gives a config "
                f"the config refuses: {exc}"
            ) from None


def space_path(source: str | Path) -> Path:
    """A YAML path, or the name of a space shipped beside the presets (``demo_sweep_space``)."""
    path = Path(source)
    if path.is_file() or path.suffix in (".yaml", ".yml"):
        return path
    shipped = PRESET_DIR / f"{source}.yaml"
    return shipped if shipped.is_file() else path


def load_space(source: str | Path, base: dict | None = None) -> list[Param]:
    """Read and check a search-space YAML file or shipped space (see ``parse_space``)."""
    path = space_path(source)
    if not path.is_file():
        shipped = sorted(p.stem for p in PRESET_DIR.glob("*_space.yaml"))
        raise ConfigError(
            f"search space file {str(source)!r} does not exist (shipped spaces: {', '.join(shipped) or 'none'})"
        )
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    try:
        return parse_space(data, base)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def to_tune(params: list[Param]) -> dict[str, Any]:
    """Ray Tune's param_space: one domain per dotted key (random search and Optuna read it)."""
    from ray import tune

    make = {
        "loguniform": lambda a: tune.loguniform(*a),
        "uniform": lambda a: tune.uniform(*a),
        "randint": lambda a: tune.randint(*a),
        "choice": lambda a: tune.choice(list(a)),
    }
    return {p.key: make[p.kind](p.args) for p in params}
