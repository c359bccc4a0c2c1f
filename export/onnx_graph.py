"""Small ONNX graph helpers shared by the exporter's steps (no step imports another through them): the exported
graph's I/O names, the torch module scope a node came from, and a topological re-order after graph edits."""
from __future__ import annotations

from clipad.runtime.errors import ClipadError

INPUT_NAME = "images"
OUTPUT_NAMES = ("anomaly_map", "image_score")
MEMORY_FEATURES = "patch_features"   # the optional third output (export-engine --memory-features)
SCOPE_KEY = "pkg.torch.onnx.name_scopes"


def scopes(node) -> str:
    """The torch module path(s) the exporter recorded for ``node`` ("" when none)."""
    return next((p.value for p in node.metadata_props if p.key == SCOPE_KEY), "")


def topological_order(graph) -> None:
    """Reorder nodes so each comes after its inputs' producers (the converter appends its Casts at the end, which
    the ONNX checker rejects), keeping the original order where it is free."""
    import heapq

    nodes = list(graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    needs = [{producer[x] for x in n.input if x in producer and producer[x] != i} for i, n in enumerate(nodes)]
    users = [[] for _ in nodes]
    for i, deps in enumerate(needs):
        for d in deps:
            users[d].append(i)
    waiting = [len(d) for d in needs]
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for u in users[i]:
            waiting[u] -= 1
            if waiting[u] == 0:
                heapq.heappush(ready, u)
    if len(order) != len(nodes):
        raise ClipadError("internal error: the converted graph has a cycle")
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
