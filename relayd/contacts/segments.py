"""Segment filters: a small JSON language over contact attributes, compiled to one SQL
condition. Every value and attribute name is a bound parameter (json_extract with a quoted
path), never pasted into the SQL text.

    {"all": [{"attr": "country", "op": "eq", "value": "DE"},
             {"any": [{"attr": "age", "op": "ge", "value": 18},
                      {"not": {"attr": "vip", "op": "exists"}}]}]}

Ops: eq ne lt le gt ge (a string or a number; lt..ge compare numbers with numbers and strings
with strings, never across), in (an array of them), contains (a substring of a string, or an
element of an array), exists (value true, the default, or false). A contact without the
attribute matches only ``ne``, ``exists: false`` and a ``not`` around another test.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from typing import Any

from relayd.contacts import Invalid

OPS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "contains", "exists")
MAX_DEPTH = 8
MAX_TESTS = 100
MAX_IN = 1000
_COMPARE = {"eq": "=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}
_NUMBER = "('integer', 'real')"


class _Compiler:
    def __init__(self, known: Collection[str] | None, column: str) -> None:
        self.known, self.column = known, column
        self.params: list[Any] = []
        self.tests = 0

    def node(self, node: Any, where: str, depth: int) -> str:
        if not isinstance(node, dict):
            raise Invalid(where, "a test {attr, op, value} or {all|any: [...]} or {not: ...}")
        if depth > MAX_DEPTH:
            raise Invalid(where, f"nested deeper than {MAX_DEPTH}")
        groups = [k for k in ("all", "any", "not") if k in node]
        if groups:
            key = groups[0]
            extra = sorted(set(node) - {key})
            if extra:
                raise Invalid(f"{where}.{extra[0]}", f"not allowed beside {key!r}")
            if key == "not":
                return f"NOT {self.node(node['not'], f'{where}.not', depth + 1)}"
            items = node[key]
            if not isinstance(items, list) or not items:
                raise Invalid(f"{where}.{key}", "a non-empty array of tests")
            parts = [self.node(n, f"{where}.{key}[{i}]", depth + 1) for i, n in enumerate(items)]
            return "(" + (" AND " if key == "all" else " OR ").join(parts) + ")"
        return self.test(node, where)

    def test(self, node: dict[str, Any], where: str) -> str:
        extra = sorted(set(node) - {"attr", "op", "value"})
        if extra:
            raise Invalid(f"{where}.{extra[0]}", "unknown key (attr, op, value; all, any, not)")
        self.tests += 1
        if self.tests > MAX_TESTS:
            raise Invalid(where, f"more than {MAX_TESTS} tests")
        attr = node.get("attr")
        if not isinstance(attr, str) or not attr:
            raise Invalid(f"{where}.attr", "an attribute name is needed")
        if self.known is not None and attr not in self.known:
            raise Invalid(f"{where}.attr", f"no contact of the list has an attribute {attr!r}")
        if '"' in attr:
            raise Invalid(f"{where}.attr", "an attribute name has no '\"'")
        op = node.get("op")
        if op not in OPS:
            raise Invalid(f"{where}.op", f"{op!r} is not an op: one of {', '.join(OPS)}")
        value = node.get("value")
        path = f'$."{attr}"'
        col = self.column
        if op == "exists":
            if value is None:
                value = True
            if not isinstance(value, bool):
                raise Invalid(f"{where}.value", "exists takes true or false")
            self.params.append(path)
            return f"(json_type({col}, ?) IS {'NOT ' if value else ''}NULL)"
        if op == "in":
            if not isinstance(value, list) or not 1 <= len(value) <= MAX_IN:
                raise Invalid(f"{where}.value", f"in takes an array of 1 to {MAX_IN} values")
            for i, v in enumerate(value):
                _scalar(v, f"{where}.value[{i}]")
            self.params += [path, json.dumps(value)]
            return f"coalesce(json_extract({col}, ?) IN (SELECT value FROM json_each(?)), 0)"
        _scalar(value, f"{where}.value")
        if op == "contains":
            self.params += [path, path, value, path, value]
            return (
                f"(CASE json_type({col}, ?) WHEN 'text' THEN instr(json_extract({col}, ?), ?) > 0"
                f" WHEN 'array' THEN EXISTS (SELECT 1 FROM json_each({col}, ?) WHERE value = ?)"
                f" ELSE 0 END)"
            )
        kinds = "('text')" if isinstance(value, str) else _NUMBER
        self.params += [path, path, value]
        sql = f"coalesce(json_type({col}, ?) IN {kinds} AND json_extract({col}, ?) {{}} ?, 0)"
        if op == "ne":
            return f"NOT {sql.format('=')}"
        return sql.format(_COMPARE[op])


def _scalar(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise Invalid(where, "a string or a number")


def compile_filter(
    spec: Any, known: Collection[str] | None, column: str = "c.attrs", root: str = "filter"
) -> tuple[str, list[Any]]:
    """The SQL condition on ``column`` (a contact's attributes) and its parameters. ``known``:
    the attribute names the list's contacts have (None: not checked); a name outside them, an
    unknown op or a malformed test raises Invalid naming its path, e.g. ``filter.all[1].attr``."""
    c = _Compiler(known, column)
    sql = c.node(spec, root, 1)
    return sql, c.params
