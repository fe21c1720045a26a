"""The package's import graph: no cycles, and dependencies that point one way.

Every import is read from the source (module level and inside functions alike), so a
lazy import that hides a cycle at run time is found here too.
"""

import ast
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "src" / "stalwart"


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the stalwart modules it imports (``from pkg import sub`` names pkg.sub)."""
    modules = _modules()
    graph = {}
    for name, (path, package) in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = name.split(".")[:None if package else -1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iteratively)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on_stack:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_package_has_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 50 and graph["stalwart.server.server"]  # the walk really read the tree
    assert cycles(graph) == []


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for w in graph[todo.pop()] - seen:
            seen.add(w)
            todo.append(w)
    return seen


@pytest.mark.parametrize("lower, upper", [
    ("stalwart.shard", "stalwart.server"),        # recovery and servers act on a shard through it
    ("stalwart.shard", "stalwart.recovery"),
    ("stalwart.recovery", "stalwart.server"),     # strategies never reach into the server
    ("stalwart.recovery", "stalwart.worker"),
    ("stalwart.optim", "stalwart.server"),        # shared by servers and stateless workers
    ("stalwart.optim", "stalwart.worker"),
    ("stalwart.transport", "stalwart.config"),    # the job config includes LTP's section, not the reverse
    ("stalwart.spec", "stalwart.launch"),         # roles read their spec without the launchers
    ("stalwart.worker", "stalwart.server"),
    ("stalwart.server", "stalwart.worker"),
])
def test_dependencies_point_one_way(lower, upper):
    graph = import_graph()
    starts = [m for m in graph if m == lower or m.startswith(lower + ".")]
    bad = {m: sorted(w for w in reaches(graph, m) if w == upper or w.startswith(upper + "."))
           for m in starts}
    assert {m: w for m, w in bad.items() if w} == {}


def test_servers_and_the_coordinator_start_without_torch():
    # A restarted server must be back within a second or so; importing torch costs seconds.
    probe = ("import sys, stalwart.launch.role, stalwart.server.main, stalwart.control.main; "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.strip() == "False"
