"""DeepSpeed hostfile parsing and validation (the file ``deepspeed --hostfile`` reads).

Format (DeepSpeed's): one host per line, ``<hostname> slots=<N>``; ``#`` starts a comment;
blank lines are ignored. The world size a hostfile implies is the sum of its slots (the
launcher's ``--num_nodes``/``--num_gpus``/``--include`` may narrow it; the preflight compares
against ``WORLD_SIZE`` when the launcher has set it).

Parsing never raises on bad content: it returns the hosts it understood and one message per
problem (line number, the line, what is wrong), so the preflight can report every problem at
once. Only an unreadable file is reported as a single problem.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

_LINE = re.compile(r"^(?P<host>[A-Za-z0-9_.:\-\[\]]+)\s+slots\s*=\s*(?P<slots>\S+)$")


@dataclass(frozen=True)
class Host:
    """One hostfile entry."""

    name: str
    """Hostname or IP as ssh/pdsh reaches it."""
    slots: int
    """Processes (accelerators) to start on it."""
    line: int
    """1-based line number in the file (for messages)."""


def parse_hostfile_text(text: str, source: str = "hostfile") -> tuple[list[Host], list[str]]:
    """Parse hostfile content -> (hosts, problems). ``source`` prefixes the messages."""
    hosts: list[Host] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for no, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _LINE.match(line)
        if m is None:
            problems.append(f"{source}:{no}: expected '<host> slots=<N>', got {raw.strip()!r}")
            continue
        name, slots_text = m.group("host"), m.group("slots")
        if not slots_text.isdigit() or int(slots_text) < 1:
            problems.append(f"{source}:{no}: slots must be a positive integer, got {slots_text!r}")
            continue
        if name in seen:
            problems.append(f"{source}:{no}: duplicate host {name!r} (first on line {seen[name]})")
            continue
        seen[name] = no
        hosts.append(Host(name=name, slots=int(slots_text), line=no))
    if not hosts and not problems:
        problems.append(f"{source}: no hosts (expected lines like 'node1 slots=8')")
    return hosts, problems


def parse_hostfile(path: str | Path) -> tuple[list[Host], list[str]]:
    """Parse the hostfile at ``path`` -> (hosts, problems)."""
    p = Path(path)
    if not p.is_file():
        return [], [f"hostfile not found: {p}"]
    try:
        text = p.read_text()
    except (OSError, UnicodeDecodeError) as e:
        return [], [f"hostfile {p}: cannot read: {e}"]
    return parse_hostfile_text(text, source=str(p))


def world_size(hosts: list[Host]) -> int:
    """Processes a hostfile implies: the sum of its slots."""
    return sum(h.slots for h in hosts)
