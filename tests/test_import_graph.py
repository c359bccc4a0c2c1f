"""The package's import graph, read from the source (every import statement, lazy ones inside functions included):
no module imports a module that imports it back, data flows one way (runtime ← calibration ← export ← benchmarks),
and the export steps never import their orchestrator."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = {"clipad": "clipad", "clipad.runtime": "runtime", "clipad.runtime.backends": "runtime/backends",
            "clipad.runtime.detect": "runtime/detect", "clipad.runtime.serving": "runtime/serving",
            "clipad.runtime.station": "runtime/station", "clipad.runtime.doctor": "runtime/doctor",
            "clipad.export": "export", "clipad.export.models": "export/models", "clipad.calibration": "calibration",
            "clipad.benchmarks": "benchmarks"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in sorted((REPO / folder).glob("*.py")):
            found[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The clipad modules ``name`` imports (explicit targets only, not the parent packages Python also loads)."""
    package = name if path.stem == "__init__" else name.rsplit(".", 1)[0]
    targets = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets.add(module)
            targets.update(f"{module}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    return {t for t in targets if t in known and t != name}


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    edges = graph()
    assert len(edges) > 40  # the walk found the package
    assert cycles(edges) == []


def test_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def layer(name: str) -> str:
    return name.split(".")[1] if name.count(".") else "clipad"


def test_data_flows_one_way():
    allowed = {"clipad": {"clipad"}, "runtime": {"runtime", "clipad"}, "calibration": {"calibration", "runtime", "clipad"},
               "export": {"export", "runtime", "calibration", "clipad"},
               "benchmarks": {"benchmarks", "export", "calibration", "runtime", "clipad"}}
    for name, targets in graph().items():
        for target in targets:
            assert layer(target) in allowed[layer(name)], f"{name} imports {target}"


def test_runtime_never_imports_torch_or_export():
    for name, path in modules().items():
        if layer(name) != "runtime":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            assert not any(n.split(".")[0] == "torch" or n.startswith(("clipad.export", "clipad.calibration"))
                           for n in names), f"{name} imports {names}"


def test_steps_and_backends_do_not_import_their_orchestrators():
    edges = graph()
    for step in ("onnx_export", "precision_step", "convert", "tensorrt_build", "triton_repo", "options", "reference"):
        assert not edges[f"clipad.export.{step}"] & {"clipad.export.pipeline", "clipad.export.cli"}, step
    for backend in ("base", "onnxruntime", "openvino", "tensorrt", "triton", "cuda_buffers"):
        assert "clipad.runtime.backends.registry" not in edges[f"clipad.runtime.backends.{backend}"], backend
    assert edges["clipad.runtime.backends.base"] <= {"clipad.runtime.errors"}


def test_the_edge_core_does_not_import_commands_or_serving():
    """The layout's promise: the core (manifest, policy, pre/post, sources, backends, detector) stands without the
    edge-detect command and without serving; serving and the command build on the core."""
    edges = graph()

    def within(module: str, *packages: str) -> bool:   # "clipad.runtime.detect" is not "clipad.runtime.detector"
        return any(module == p or module.startswith(p + ".") for p in packages)

    outer = ("clipad.runtime.detect", "clipad.runtime.serving", "clipad.runtime.station")
    core = [m for m in edges if m.startswith("clipad.runtime.") and not within(
        m, *outer, "clipad.runtime.commands", "clipad.runtime.triton_python")]
    assert len(core) > 20 and "clipad.runtime.detector" in core
    for module in core:
        bad = {t for t in edges[module] if within(t, *outer)}
        assert not bad, f"{module} imports {bad}"
    for module in edges:   # the station builds on the core and never on the command or on serving
        if within(module, "clipad.runtime.station"):
            assert not {t for t in edges[module] if within(t, "clipad.runtime.detect", "clipad.runtime.serving")}
