"""Node and bitmap names on the destination that differ from the source's, in the spirit
of QEMU's `block-bitmap-mapping` migration parameter (libvirt's node names differ
between hosts, for example).

A mapping is an ordered list of rules; the first rule that matches a source (node, name)
decides its destination (node, name); a bitmap no rule matches keeps its names.

Rule text (CLI `--map`, repeatable):  SRC_NODE[:SRC_NAME]=[DST_NODE][:DST_NAME]
    vda=drive-virtio-disk0         every bitmap of node vda goes to node drive-virtio-disk0
    vda:daily=vda:daily-old        one bitmap renamed on the same node
    vda:daily=:daily-old           the same (an empty node keeps the source's node)
Node names cannot hold ':' in QEMU, so the first ':' separates node from name; a bitmap
name holding '=' needs the JSON form.

JSON form (CLI `--map @FILE`): a list of objects
    [{"node": "vda", "name": "daily", "dest-node": "drive0", "dest-name": "daily"}]
where "name", "dest-node" and "dest-name" may be left out (any bitmap / same name).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bitmig.protocol.spec import MAX_NAME_BYTES


class MappingError(ValueError):
    """A mapping rule or file that cannot be parsed."""


@dataclass(frozen=True)
class Rule:
    node: str
    name: str | None  # None: every bitmap of the node
    dest_node: str | None  # None: the source's node
    dest_name: str | None  # None: the source's name

    def matches(self, node: str, name: str) -> bool:
        return node == self.node and (self.name is None or name == self.name)


def _check_name(what: str, value: str) -> str:
    if not value:
        raise MappingError(f"{what} must not be empty")
    if len(value.encode()) > MAX_NAME_BYTES:
        raise MappingError(f"{what} longer than {MAX_NAME_BYTES} bytes")
    return value


class Mapping:
    """Ordered rules, first match wins; identity for what no rule matches."""

    def __init__(self, rules: list[Rule] | None = None) -> None:
        self.rules = list(rules or [])

    def __bool__(self) -> bool:
        return bool(self.rules)

    def map(self, node: str, name: str) -> tuple[str, str]:
        for r in self.rules:
            if r.matches(node, name):
                return (r.dest_node or node, r.dest_name or name)
        return node, name

    def to_json(self) -> list[dict[str, str]]:
        out = []
        for r in self.rules:
            d = {"node": r.node}
            if r.name is not None:
                d["name"] = r.name
            if r.dest_node is not None:
                d["dest-node"] = r.dest_node
            if r.dest_name is not None:
                d["dest-name"] = r.dest_name
            out.append(d)
        return out

    @classmethod
    def parse(cls, specs: list[str] | None) -> Mapping:
        """Rules from `--map` values: rule text, or @FILE holding the JSON form."""
        rules: list[Rule] = []
        for spec in specs or []:
            if spec.startswith("@"):
                rules += parse_json_file(spec[1:])
            else:
                rules.append(parse_rule(spec))
        return cls(rules)


def parse_rule(text: str) -> Rule:
    src, sep, dst = text.partition("=")
    if not sep:
        raise MappingError(f"mapping rule {text!r}: expected SRC_NODE[:NAME]=[DST_NODE][:NAME]")
    node, colon, name = src.partition(":")
    dnode, dcolon, dname = dst.partition(":")
    if dcolon and dname and not colon:
        raise MappingError(f"mapping rule {text!r}: a destination name needs a source name "
                           "(rename one bitmap, not every bitmap of a node)")
    return Rule(
        node=_check_name(f"mapping rule {text!r}: source node", node),
        name=_check_name(f"mapping rule {text!r}: source name", name) if colon else None,
        dest_node=_check_name("destination node", dnode) if dnode else None,
        dest_name=_check_name("destination name", dname) if dname else None,
    )


def parse_json_file(path: str) -> list[Rule]:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise MappingError(f"mapping file {path}: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MappingError(f"mapping file {path}: not JSON: {e}") from None
    if not isinstance(data, list):
        raise MappingError(f"mapping file {path}: expected a JSON list of rules")
    rules = []
    for i, item in enumerate(data):
        where = f"mapping file {path}, rule {i}"
        if not isinstance(item, dict) or not isinstance(item.get("node"), str):
            raise MappingError(f"{where}: expected an object with a string \"node\"")
        unknown = set(item) - {"node", "name", "dest-node", "dest-name"}
        if unknown:
            raise MappingError(f"{where}: unknown keys {sorted(unknown)}")
        vals = {}
        for k in ("name", "dest-node", "dest-name"):
            v = item.get(k)
            if v is not None and not isinstance(v, str):
                raise MappingError(f"{where}: {k!r} must be a string")
            vals[k] = _check_name(f"{where}: {k}", v) if v is not None else None
        if vals["dest-name"] is not None and vals["name"] is None:
            raise MappingError(f"{where}: \"dest-name\" needs \"name\"")
        rules.append(Rule(_check_name(f"{where}: node", item["node"]), vals["name"],
                          vals["dest-node"], vals["dest-name"]))
    return rules
