"""The DAG maths: cycles (as a readable path), topological layers, failed ancestors.

Pure functions over ``{step_id: [needed step ids]}`` in definition order, so they are cheap to
call from a hook and easy to test on their own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

Graph = Mapping[str, Sequence[str]]


def find_cycle(graph: Graph) -> list[str] | None:
    """A cycle as a path that ends where it starts (``["a", "b", "a"]``), or None.

    Iterative depth-first search, so a 2000-step chain does not hit Python's recursion limit.
    Unknown ids in ``needs`` are ignored here (reported separately).
    """
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(graph, white)
    for root in graph:
        if colour[root] != white:
            continue
        path = [root]
        stack = [iter(graph[root])]
        colour[root] = grey
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                colour[path.pop()] = black
                continue
            if child not in colour:
                continue
            if colour[child] == grey:
                return [*path[path.index(child) :], child]
            if colour[child] == white:
                colour[child] = grey
                path.append(child)
                stack.append(iter(graph[child]))
    return None


def layer_index(graph: Graph) -> dict[str, int]:
    """Each step's layer: 0 with no needs, else one more than its deepest need (graph acyclic)."""
    index: dict[str, int] = {}
    for step in topological_order(graph):
        index[step] = 1 + max((index[n] for n in graph[step]), default=-1)
    return index


def layers(graph: Graph) -> list[list[str]]:
    """Steps grouped by layer; within a layer, in definition order."""
    index = layer_index(graph)
    grouped: list[list[str]] = [[] for _ in range(max(index.values(), default=-1) + 1)]
    for step in graph:
        grouped[index[step]].append(step)
    return grouped


def topological_order(graph: Graph) -> list[str]:
    """Every step after all of its needs; ties keep definition order. Raises on a cycle."""
    position = {step: i for i, step in enumerate(graph)}
    waiting = {step: len(set(graph[step])) for step in graph}
    dependants: dict[str, list[str]] = {step: [] for step in graph}
    for step, needs in graph.items():
        for need in set(needs):
            dependants[need].append(step)
    ready = sorted((s for s, n in waiting.items() if n == 0), key=position.__getitem__)
    order: list[str] = []
    while ready:
        step = ready.pop(0)
        order.append(step)
        released = []
        for child in dependants[step]:
            waiting[child] -= 1
            if waiting[child] == 0:
                released.append(child)
        if released:
            ready = sorted([*ready, *released], key=position.__getitem__)
    if len(order) != len(graph):
        raise ValueError(f"cycle: {' -> '.join(find_cycle(graph) or [])}")
    return order


def descendants(graph: Graph, step: str) -> set[str]:
    """Every step that (transitively) needs ``step``."""
    dependants: dict[str, list[str]] = {s: [] for s in graph}
    for child, needs in graph.items():
        for need in needs:
            dependants[need].append(child)
    found: set[str] = set()
    todo = [step]
    while todo:
        for child in dependants[todo.pop()]:
            if child not in found:
                found.add(child)
                todo.append(child)
    return found
