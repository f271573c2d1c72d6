"""A benchmark figure's target: a comparison and a value, stated once for `xenpv bench` (which writes it
into its JSON) and for the nightly history (which reads it back and says whether a night met it)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from xenpv.base.errors import ConfigError

_TARGET_RE = re.compile(r"^\s*(<=|>=|<|>|≤|≥)\s*([-+]?[0-9][0-9,]*(?:\.[0-9]+)?(?:[eE][-+]?[0-9]+)?)\s*(.*?)\s*$")
_OPS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "≤": "<=", "≥": ">="}


@dataclass
class Target:
    text: str | None
    op: str | None = None
    value: float | None = None

    def met(self, value: float | None) -> bool | None:
        """True or False when the target is a comparison and the figure a number; None when it cannot say."""
        if self.op is None or self.value is None or value is None:
            return None
        return {"<": value < self.value, "<=": value <= self.value,
                ">": value > self.value, ">=": value >= self.value}[self.op]


def parse_target(raw: object, unit: str, where: str) -> Target:
    """A figure's target: the machine-readable {"op": ">=", "value": 5000} or the older text "< 150 ms"
    (a text whose unit is not the figure's is kept as text only: comparing across units would lie)."""
    if raw is None or raw == "":
        return Target(None)
    if isinstance(raw, dict):
        op, value = raw.get("op"), raw.get("value")
        if op not in _OPS or isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: target {raw!r} is not {{'op': one of < <= > >=, 'value': a number}}")
        return Target(f"{_OPS[op]} {value:g}", _OPS[op], float(value))
    if not isinstance(raw, str):
        raise ConfigError(f"{where}: target {raw!r} is neither text nor {{'op', 'value'}}")
    m = _TARGET_RE.match(raw)
    if m is None:
        return Target(raw)
    op, number, target_unit = m.groups()
    if target_unit and target_unit != unit:
        return Target(raw)
    return Target(raw, _OPS[op], float(number.replace(",", "")))


def target_json(text: str, unit: str) -> dict[str, object] | str:
    """What `xenpv bench --json` writes for a target given as text: {"op": ">=", "value": 0.25} when it is
    a comparison in the figure's unit, else the text itself (shown, never compared)."""
    target = parse_target(text, unit, "target")
    if target.op is None or target.value is None:
        return text
    return {"op": target.op, "value": target.value}
