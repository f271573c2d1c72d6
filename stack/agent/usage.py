"""The usage lines of the guest console's commands, as a grammar: what `help` prints is what the console
accepts and what tab completes, because all three come from the same lines.

A command's usage is a tuple of alternatives, each a line of tokens (after the command's name):

    WORD          a placeholder: any one word (all capitals, digits and `_`, as `T`, `LBA`, `P1`)
    WORD...       one or more words, to the end of the line
    a|b|c         one of these literal words (`S0|S3|S4|S5` too: a choice is always literal)
    literal       the word itself (`list`, `hex`, `--timeout`, `/v`)
    [ ... ]       the tokens inside, or nothing (groups nest)

Only the shape is checked here (which words, how many); a command still converts and checks the values
(`T` a number, `ADDR` an IPv4 address) and raises UsageError when they do not fit.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Union

_PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*$")


class UsageError(Exception):
    """A command line its command does not accept; the console answers with the command's usage."""

    def __init__(self, detail: str = "") -> None:
        super().__init__(detail)
        self.detail = detail


@dataclass(frozen=True)
class Literal:
    words: tuple[str, ...]


@dataclass(frozen=True)
class Placeholder:
    name: str
    many: bool = False


@dataclass(frozen=True)
class Group:
    items: tuple["Item", ...]


Item = Union[Literal, Placeholder, Group]


def _tokens(line: str) -> list[str]:
    return line.replace("[", " [ ").replace("]", " ] ").split()


def parse_usage(line: str) -> tuple[Item, ...]:
    """One alternative's tokens as grammar items; a malformed line is a bug of the command, so ValueError."""
    tokens = _tokens(line)
    pos = 0

    def seq(closing: bool) -> tuple[Item, ...]:
        nonlocal pos
        items: list[Item] = []
        while pos < len(tokens):
            tok = tokens[pos]
            pos += 1
            if tok == "]":
                if not closing:
                    raise ValueError(f"usage {line!r}: unbalanced ]")
                return tuple(items)
            if tok == "[":
                items.append(Group(seq(True)))
            elif "|" in tok:
                items.append(Literal(tuple(tok.split("|"))))
            elif tok.endswith("...") and _PLACEHOLDER.match(tok[:-3]):
                items.append(Placeholder(tok[:-3], many=True))
            elif _PLACEHOLDER.match(tok):
                items.append(Placeholder(tok))
            else:
                items.append(Literal((tok,)))
        if closing:
            raise ValueError(f"usage {line!r}: unbalanced [")
        return tuple(items)

    return seq(False)


def _ends(items: tuple[Item, ...], words: list[str], start: int) -> set[int]:
    """Every index into `words` at which a match of `items` from `start` can end."""
    ends = {start}
    for item in items:
        after: set[int] = set()
        for i in ends:
            if isinstance(item, Literal):
                if i < len(words) and words[i] in item.words:
                    after.add(i + 1)
            elif isinstance(item, Placeholder):
                if i < len(words):
                    after |= set(range(i + 1, len(words) + 1)) if item.many else {i + 1}
            else:  # a group: skipped, or matched
                after |= {i} | _ends(item.items, words, i)
        ends = after
        if not ends:
            break
    return ends


def matches(items: tuple[Item, ...], words: list[str]) -> bool:
    return len(words) in _ends(items, words, 0)


def _next_literals(items: tuple[Item, ...], words: list[str], start: int) -> tuple[set[int], set[str]]:
    """Like _ends, and also the literal words that could come at len(words) (what completion offers)."""
    ends, offered = {start}, set()
    for item in items:
        after: set[int] = set()
        for i in ends:
            if isinstance(item, Literal):
                if i == len(words):
                    offered |= set(item.words)
                elif words[i] in item.words:
                    after.add(i + 1)
            elif isinstance(item, Placeholder):
                if i < len(words):
                    after |= set(range(i + 1, len(words) + 1)) if item.many else {i + 1}
            else:  # a group: skipped, or matched
                inner_ends, inner_offered = _next_literals(item.items, words, i)
                after |= {i} | inner_ends
                offered |= inner_offered
        ends = after
    return ends, offered


@dataclass(frozen=True)
class Usage:
    """A command's alternatives, parsed once when the command registers."""

    lines: tuple[str, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_grammar", tuple(parse_usage(line) for line in self.lines))

    def accepts(self, words: list[str]) -> bool:
        return any(matches(g, words) for g in self._grammar)  # type: ignore[attr-defined]

    def completions(self, words: list[str], prefix: str) -> list[str]:
        """Literal words that may follow `words` and start with `prefix`."""
        offered: set[str] = set()
        for g in self._grammar:  # type: ignore[attr-defined]
            offered |= _next_literals(g, words, 0)[1]
        return sorted(w for w in offered if w.startswith(prefix))

    def placeholders(self) -> set[str]:
        names: set[str] = set()

        def walk(items: tuple[Item, ...]) -> None:
            for item in items:
                if isinstance(item, Placeholder):
                    names.add(item.name)
                elif isinstance(item, Group):
                    walk(item.items)

        for g in self._grammar:  # type: ignore[attr-defined]
            walk(g)
        return names
