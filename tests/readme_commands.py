"""The README's cluster commands, as the tests run them (so the two cannot drift apart).

A command is found by how it starts (e.g. ``spark-submit --master spark://``), joined over its
``\\`` continuation lines, and its site-specific parts (master URL, shared folder, ...) are
replaced by the test's own; each of those parts must occur in the command, so a README edit
that renames one fails the test instead of silently running something else.
"""

from __future__ import annotations

import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_command(start: str, readme: Path = README) -> str:
    """The README command whose first line starts with ``start`` (continuations joined)."""
    lines = readme.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith(start):
            parts = [line.strip()]
            while parts[-1].endswith("\\"):
                parts[-1] = parts[-1][:-1].rstrip()
                i += 1
                parts.append(lines[i].strip())
            return " ".join(parts)
    raise AssertionError(f"README.md has no command starting with {start!r}")


def substitute(command: str, replace: dict[str, str],
               words: dict[str, str] | None = None) -> list[str]:
    """``command`` split as the shell would, with every ``replace`` key replaced inside the
    words and every ``words`` key replacing a whole word (each key must occur)."""
    split = shlex.split(command)
    missing = [k for k in replace if k not in command]
    missing += [k for k in (words or {}) if k not in split]
    assert not missing, f"README command lacks {missing}: {command}"
    out = []
    for word in split:
        if words and word in words:
            out.append(words[word])
            continue
        for old, new in replace.items():
            word = word.replace(old, new)
        out.append(word)
    return out
