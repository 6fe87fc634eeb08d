"""The path language of source files: where a value lies in an upstream JSON document.

A path is dot-separated steps (a dot inside `[...]` does not separate):
  `key`          an object's member
  `0`            a list's element by index (an object's member "0" when the value is an object)
  `[key=value]`  the first element of a list that is an object whose `key` is the string `value`
  `*`            every element of a list (only where a path may give many values: `records`)
The empty path is the document itself. A path that finds nothing gives None. Pure functions.
"""

from __future__ import annotations

from typing import Any, Callable

Step = tuple  # ("key", name) | ("index", n, name) | ("match", key, value) | ("all",)
Path = tuple  # of Steps


class PathError(ValueError):
    """A path that cannot be parsed; the message says what is wrong, never echoes secrets."""


def _segments(text: str) -> list[str]:
    """Split at dots outside brackets."""
    segments, current, depth = [], "", 0
    for char in text:
        if char == "[":
            if depth:
                raise PathError("has '[' inside '[...]'")
            depth = 1
        elif char == "]":
            if not depth:
                raise PathError("has ']' without '['")
            depth = 0
        elif char == "." and not depth:
            segments.append(current)
            current = ""
            continue
        current += char
    if depth:
        raise PathError("has '[' without ']'")
    segments.append(current)
    return segments


def parse_path(text: str, *, many: bool = False) -> Path:
    """The steps of `text`; `many` allows `*`. PathError names what is wrong."""
    if text == "":
        return ()
    steps = []
    for segment in _segments(text):
        if segment == "":
            raise PathError("has an empty step (two dots, or a dot at an end)")
        if segment.startswith("["):
            inner = segment[1:-1] if segment.endswith("]") else None
            key, equals, value = (inner or "").partition("=")
            if inner is None or not equals or not key:
                raise PathError(f"step {segment!r} must be [key=value]")
            steps.append(("match", key, value))
        elif "[" in segment or "]" in segment:
            raise PathError(f"step {segment!r} mixes a key and [...]; separate them with a dot")
        elif segment == "*":
            if not many:
                raise PathError("uses '*', which only `records` may")
            steps.append(("all",))
        elif segment.isdigit() and segment.isascii():
            steps.append(("index", int(segment), segment))
        else:
            steps.append(("key", segment))
    return tuple(steps)


def _step(value: Any, step: Step) -> Any:
    kind = step[0]
    if kind == "key":
        return value.get(step[1]) if isinstance(value, dict) else None
    if kind == "index":
        if isinstance(value, list):
            return value[step[1]] if step[1] < len(value) else None
        return value.get(step[2]) if isinstance(value, dict) else None
    if kind == "match":
        if isinstance(value, list):
            for element in value:
                if isinstance(element, dict) and element.get(step[1]) == step[2]:
                    return element
        return None
    raise ValueError(f"step {step!r} gives many values; use resolve_all")


def resolve(document: Any, path: Path) -> Any:
    """The one value at `path` in `document`, or None when the path finds nothing."""
    value = document
    for step in path:
        if value is None:
            return None
        value = _step(value, step)
    return value


def resolve_all(document: Any, path: Path) -> Any:
    """The value at a path that may hold `*`: without one, as `resolve`; with one, the list of
    what the rest of the path finds from each element (None where it finds nothing), or None
    when the value before the `*` is not a list."""
    for position, step in enumerate(path):
        if step[0] == "all":
            elements = resolve(document, path[:position])
            if not isinstance(elements, list):
                return None
            rest = path[position + 1:]
            found = []
            for element in elements:
                value = resolve_all(element, rest)
                if any(s[0] == "all" for s in rest) and isinstance(value, list):
                    found.extend(value)
                else:
                    found.append(value)
            return found
    return resolve(document, path)


def getter(path: Path) -> Callable[[Any], Any]:
    """`resolve` for one path as a function, made once: a path of object keys only (most of a
    source's fields) is read by plain lookups, which an import does for every field of every item."""
    if not all(step[0] == "key" for step in path):
        return lambda document: resolve(document, path)
    keys = tuple(step[1] for step in path)
    if len(keys) == 1:
        key = keys[0]
        return lambda document: document.get(key) if isinstance(document, dict) else None

    def get(document: Any) -> Any:
        for key in keys:
            if not isinstance(document, dict):
                return None
            document = document.get(key)
        return document

    return get
