"""Values made from parameters that several layers read, made once at a cut of their own."""

from __future__ import annotations

import itertools

from torch import fx

from remat.capture.graph import made_without_activations, split_linear

__all__ = ["hoist_shared_values"]


def hoist_shared_values(gm: fx.GraphModule) -> None:
    """Move each value made from parameters without FLOPs that several pieces read to the start
    of a piece up to the first that reads it, so that it is a cut of its own (in place; ``gm``
    is recompiled).

    T5's position bias is made inside the first layer, from a parameter, and every later
    layer reads it: there it is a second new value across every layer boundary, and no
    layer is cut. Moved to the start of the first layer, it is the new value of a cut
    just before that layer; later cuts carry it. It is still made once, and its
    gradient summed as before.
    """
    input_only, derived = made_without_activations(gm)
    if not derived:
        return
    pieces = split_linear(gm, recomputed=derived)
    needed_by: dict[fx.Node, list[int]] = {}  # derived value -> the pieces that would make it again
    for k, piece in enumerate(pieces):
        made = set().union(*(_ancestors(a, derived) for n in piece.nodes for a in n.all_input_nodes if a in derived))
        for value in made:
            needed_by.setdefault(value, []).append(k)
    shared = {value for value, readers in needed_by.items() if len(readers) > 1}
    # The last shared values on each path: what the first piece that needs them makes for all.
    frontier = [value for value in gm.graph.nodes if value in shared and any(u not in shared for u in value.users)]
    # Where to make one: at the start of the last piece, up to the first that needs it, where one
    # value at most is live besides those the caller holds (a layer's input, not inside its
    # attention, where a plan keeping the new cut would keep the queries, keys and values too).
    last_reader = {value: k for k, piece in enumerate(pieces) for value in piece.inputs}
    starts = [0] * (len(pieces) + 1)  # live_at[k]: outputs of pieces before k that k or later reads
    for q, piece in enumerate(pieces):
        if not piece.held and last_reader.get(piece.output, -1) > q:
            starts[q + 1] += 1
            starts[last_reader[piece.output] + 1] -= 1
    live_at = list(itertools.accumulate(starts))
    moved = False
    for value in frontier:
        index = {n: i for i, n in enumerate(gm.graph.nodes)}
        first = min(needed_by[value])
        start = max((k for k in range(first + 1) if live_at[k] <= 1), default=first)
        anchor = min((n for n in pieces[start].nodes if n.op != "get_attr"), key=index.__getitem__)
        for node in sorted(_ancestors(value, input_only | derived), key=index.__getitem__):
            if index[node] > index[anchor]:
                anchor.prepend(node)
                moved = True
    if moved:
        gm.recompile()


def _ancestors(value: fx.Node, among: set[fx.Node]) -> set[fx.Node]:
    """``value`` and the nodes of ``among`` it is made from."""
    found: set[fx.Node] = set()
    todo = [value]
    while todo:
        node = todo.pop()
        if node in found:
            continue
        found.add(node)
        todo.extend(a for a in node.all_input_nodes if a in among)
    return found
