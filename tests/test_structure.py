"""The package's architecture, checked from its source: no import circle, no upward import,
evaluation builds no stage, one module knows the run folder's layout, and training imports
neither Spark nor pandas (the ``train`` extra is enough on a GPU node).

Imports are read with ``ast`` from every module of ``higr_dist``, those inside functions
included (a lazy import is still a dependency), so the checks see what a reader sees.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "higr_dist"

#: layers, lowest first: a module may import its own layer and the ones below, never above
LAYERS = [
    ("higr_dist", "higr_dist.layout", "higr_dist.configs", "higr_dist.config", "higr_dist.schema",
     "higr_dist.sizing"),
    ("higr_dist.data", "higr_dist.models", "higr_dist.losses", "higr_dist.tokenizer",
     "higr_dist.decode", "higr_dist.eval.metrics", "higr_dist.eval.predict"),
    ("higr_dist.stages",),
    ("higr_dist.engine",),
    ("higr_dist.etl", "higr_dist.eval", "higr_dist.run_config"),
    ("higr_dist.pipeline", "higr_dist.launch", "higr_dist.cli", "higr_dist.__main__",
     "higr_dist.tools"),
]


def _modules() -> dict[str, Path]:
    mods = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of the package that module ``name`` imports (anywhere in its body)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            for alias in node.names:
                sub = f"{mod}.{alias.name}"
                found.add(sub if sub in known else mod)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(name, path, set(mods)) for name, path in mods.items()}


def _layer(module: str) -> int:
    best, depth = None, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    assert best is not None, f"{module} is in no layer: add it to LAYERS"
    return best


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = _graph()
    assert len(graph) > 50  # the whole package was read
    assert _cycles(graph) == []


def test_no_upward_import():
    upward = [f"{m} (layer {_layer(m)}) imports {d} (layer {_layer(d)})"
              for m, deps in sorted(_graph().items()) for d in sorted(deps)
              if _layer(d) > _layer(m)]
    assert upward == []


def test_models_are_pure_and_evaluation_builds_no_stage():
    graph = _graph()
    for m, deps in graph.items():
        if m.startswith("higr_dist.models"):
            assert not {d for d in deps if not d.startswith(("higr_dist.models",
                                                             "higr_dist.config"))}, m
        if m.startswith("higr_dist.eval"):
            assert not {d for d in deps if d.startswith(("higr_dist.stages",
                                                         "higr_dist.pipeline"))}, m


#: file and folder names of the run layout (higr_dist/layout.py), as string literals
RUN_PATH_LITERAL = re.compile(
    r"""["'](final|best|export|etl|tb|plots|checkpoints|latest|quarantine|quarantine_items|"""
    r"""item_index|summary\.json|model_fp32\.pt|model\.json|manifest\.json|report\.json|"""
    r"""report\.md|slates\.jsonl|resolved_config\.yaml|run_meta\.json|shards\.json|"""
    r"""beam_sweep\.json|_SUCCESS\.json)["']""")

def _path_literals(path: Path) -> list[str]:
    """Lines of ``path`` that join a run-layout name onto a path."""
    hits = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        code = line.split("#", 1)[0]
        for m in RUN_PATH_LITERAL.finditer(code):
            before = code[:m.start()].rstrip()
            if before.endswith(("/", "joinpath(", "Path(")):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
                break
    return hits


def test_no_run_path_literal_outside_the_layout_module():
    files = [p for p in [*PACKAGE.rglob("*.py"), *(ROOT / "bench").glob("*.py")]
             if p != PACKAGE / "layout.py"]
    assert len(files) > 80
    hits = [h for p in files for h in _path_literals(p)]
    assert hits == []


def test_the_path_literal_check_sees_a_joined_name(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text('a = run_dir / "final" / "model_fp32.pt"\nb = s["final"]\n'
                   'c = Path("report.json")\nd = x.joinpath("etl")\n')
    original = sys.modules[__name__].ROOT
    try:
        sys.modules[__name__].ROOT = tmp_path
        assert [h.split(":")[1] for h in _path_literals(bad)] == ["1", "3", "4"]
    finally:
        sys.modules[__name__].ROOT = original


def test_training_imports_neither_spark_nor_pandas():
    """A GPU node installs the ``train`` extra only: the launcher, the trainer, every stage,
    evaluation and ``higr run``'s module import without PySpark, py4j, pandas or SciPy."""
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("pyspark", "py4j", "pandas", "scipy"):
            raise ImportError("not installed: " + name)
sys.meta_path.insert(0, Block())
import higr_dist.launch, higr_dist.engine.trainer, higr_dist.eval.harness, higr_dist.pipeline
from higr_dist.stages.base import import_builtin_stages
import_builtin_stages()
print("ok")
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
