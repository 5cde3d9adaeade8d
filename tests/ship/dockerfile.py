"""A small Dockerfile parser: stages, their instructions and what each stage builds on."""

from __future__ import annotations

import re
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Instruction:
    keyword: str  # upper case
    args: str  # continuation lines joined, comments removed
    line: int


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction | None:
        found = self.all(keyword)
        return found[-1] if found else None


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """(first line number, instruction) with continuations joined and comment lines dropped."""
    logical: list[tuple[int, str]] = []
    pending: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and not pending):
            continue
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending.append(stripped[:-1].strip())
            continue
        pending.append(stripped)
        logical.append((start, " ".join(part for part in pending if part)))
        pending = []
    return logical


def parse_dockerfile(text: str) -> dict[str, Stage]:
    """Stages by name (index for unnamed ones), in file order."""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for number, line in _logical_lines(text):
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            match = re.fullmatch(r"(?:--\S+\s+)*(\S+)(?:\s+AS\s+(\S+))?", args.strip(), re.I)
            if match is None:
                raise ValueError(f"unparsed FROM at line {number}: {line}")
            current = Stage(name=match.group(2) or str(len(stages)), base=match.group(1))
            stages[current.name] = current
        elif current is not None:
            current.instructions.append(Instruction(keyword, args.strip(), number))
    return stages


def ancestry(stages: dict[str, Stage], name: str) -> list[Stage]:
    """The stage and every stage it builds on or copies from, transitively."""
    seen: dict[str, Stage] = {}
    todo = [name]
    while todo:
        current = todo.pop()
        if current not in stages or current in seen:
            continue
        stage = seen[current] = stages[current]
        todo.append(stage.base)
        for copy in stage.all("COPY"):
            match = re.search(r"--from=(\S+)", copy.args)
            if match:
                todo.append(match.group(1))
    return list(seen.values())


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
    import json

    try:
        parsed = json.loads(args)
    except ValueError:
        return None
    if isinstance(parsed, list) and all(isinstance(item, str) for item in parsed):
        return parsed
    return None
