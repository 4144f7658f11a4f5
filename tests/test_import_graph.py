"""The package boundaries, read from the source with `ast` (nothing is imported):

* ``embed_core`` <- ``sweeps`` <- ``ray_jobs``: nothing imports upwards, at module or function level; the one
  exception is the CLI's dispatch (`sweeps.cli._ray_jobs`), which imports ``ray_jobs.commands`` inside a
  function so that `presets`, `check`'s config validation and `export` run without Ray;
* ``embed_core`` and ``sweeps`` import no Ray at module level; the sweep config, its layout and the analysis
  import no torch / DeepSpeed / Ray at all at module level (parsing a YAML or building a report loads neither);
* no import cycle among the project's modules at module level.

Each rule is also checked on a small synthetic graph that breaks it, so a rule that cannot fail is caught.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("embed_core", "sweeps", "ray_jobs")
RANK = {"embed_core": 0, "sweeps": 1, "ray_jobs": 2}
#: (importing module, imported module) pairs allowed to point upwards, and why
UPWARD_ALLOWED = {("sweeps.cli", "ray_jobs.commands"): "the CLI's one lazy dispatch to the commands that need Ray"}
#: modules that must load without torch / DeepSpeed / Ray (a sweep YAML is parsed, a report built, without them)
LIGHT = ("sweeps.config", "sweeps.config_parse", "sweeps.merge", "sweeps.layout", "sweeps.search", "sweeps.stats", "sweeps.results", "sweeps.analysis",
         "sweeps.report", "sweeps.report_render", "sweeps.report_blocks", "sweeps.report_plots", "sweeps.synthetic_results", "embed_core.train_config",
         "embed_core.config", "embed_core.errors", "embed_core.files", "embed_core.offline")
HEAVY = ("torch", "deepspeed", "ray")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(name: str, source: str, known: set[str]) -> tuple[set[str], set[str]]:
    """(module-level imports, function-level imports) of module `name`: absolute dotted names, relative imports
    resolved, ``from pkg import sub`` resolved to ``pkg.sub`` when that is a module; imports under
    ``if TYPE_CHECKING:`` are not run and are left out."""
    is_pkg = name in known and any(m.startswith(name + ".") for m in known)
    top: set[str] = set()
    inner: set[str] = set()

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = name.split(".") if is_pkg else name.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            mod = ".".join(base + ([node.module] if node.module else []))
        else:
            mod = node.module or ""
        subs = [f"{mod}.{a.name}" for a in node.names if f"{mod}.{a.name}" in known]
        return subs if len(subs) == len(node.names) else subs + [mod]

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _is_type_checking(child):
                continue
            deeper = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            into = inner if in_function else top
            if isinstance(child, ast.Import):
                into.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                into.update(resolve(child))
            visit(child, deeper)

    visit(ast.parse(source), False)
    return top, inner


def import_graph() -> dict[str, tuple[set[str], set[str]]]:
    mods = project_modules()
    return {m: imports_of(m, p.read_text(), set(mods)) for m, p in mods.items()}


# ---------------------------------------------------------------------------------------- the rules
def upward_imports(graph: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    bad = []
    for mod, (top, inner) in graph.items():
        for level, targets in (("module", top), ("function", inner)):
            for t in targets:
                src, dst = mod.split(".")[0], t.split(".")[0]
                if dst in RANK and RANK[dst] > RANK[src] and (mod, t) not in UPWARD_ALLOWED:
                    bad.append(f"{mod} imports {t} ({level} level)")
    return sorted(bad)


def heavy_imports(graph: dict[str, tuple[set[str], set[str]]]) -> list[str]:
    bad = []
    for mod, (top, _) in graph.items():
        banned = HEAVY if mod in LIGHT else ("ray",) if mod.split(".")[0] in ("embed_core", "sweeps") else ()
        bad += [f"{mod} imports {t} at module level" for t in sorted(top) if t.split(".")[0] in banned]
    return bad


def cycles(graph: dict[str, tuple[set[str], set[str]]]) -> list[list[str]]:
    """Module-level cycles among the graph's modules. A module importing its own package (``__init__``) is left
    out: Python runs the package first anyway, so that edge adds no order of its own."""
    edges = {m: sorted(t for t in top if t in graph and not m.startswith(t + ".")) for m, (top, _) in graph.items()}
    found, state, stack = [], {}, []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in edges[m]:
            if state.get(t) == 1:
                found.append(stack[stack.index(t):] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(edges):
        if m not in state:
            dfs(m)
    return found


def test_nothing_imports_upwards():
    assert upward_imports(import_graph()) == []


def test_no_ray_in_embed_core_or_sweeps_and_no_torch_in_the_light_modules():
    graph = import_graph()
    assert set(LIGHT) <= set(graph), "a module named in LIGHT no longer exists: update the list"
    assert heavy_imports(graph) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_the_cli_reaches_ray_jobs_in_one_place_only():
    _, inner = import_graph()["sweeps.cli"]
    assert sorted(t for t in inner if t.startswith("ray_jobs")) == ["ray_jobs.commands"]


def test_the_rules_can_fail():
    """Each rule on a synthetic graph that breaks it (and the parser on source that hides imports)."""
    known = {"embed_core", "embed_core.a", "sweeps", "sweeps.config", "sweeps.b", "ray_jobs", "ray_jobs.c"}
    src = "import ray\nfrom . import b\ndef f():\n    from ray_jobs import c\nif TYPE_CHECKING:\n    import torch\n"
    top, inner = imports_of("sweeps.config", src, known)
    assert top == {"ray", "sweeps.b"} and inner == {"ray_jobs.c"}
    graph = {"sweeps.config": (top, inner), "sweeps.b": ({"sweeps.config", "torch"}, set()),
             "embed_core.a": ({"sweeps.b"}, set()), "ray_jobs.c": (set(), set())}
    assert upward_imports(graph) == ["embed_core.a imports sweeps.b (module level)",
                                     "sweeps.config imports ray_jobs.c (function level)"]
    assert heavy_imports(graph) == ["sweeps.config imports ray at module level"]
    assert cycles(graph) == [["sweeps.b", "sweeps.config", "sweeps.b"]]


@pytest.mark.parametrize("pkg", PACKAGES)
def test_every_module_parses(pkg):
    assert any(m.startswith(pkg) for m in project_modules())


def test_readme_layout_table_names_every_module():
    """The README's Layout table lists each package folder's modules, and no module that is not there."""
    import re

    text = (ROOT / "README.md").read_text()
    table = text[text.index("## Layout"):text.index("\n## ", text.index("## Layout") + 1)]
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `([\w/]+)/` \| (.*) \|$", table, re.M)}
    for folder in ("embed_core", "embed_core/data", "sweeps", "ray_jobs"):
        have = {p.name for p in (ROOT / folder).glob("*.py") if p.name not in ("__init__.py", "__main__.py")}
        named = set(re.findall(r"`(\w+\.py)`", rows[folder]))
        assert named == have, f"{folder}: README names {sorted(named - have)} not there, misses {sorted(have - named)}"


# ---------------------------------------------------------------------------------------- size
MAX_FUNCTION_LINES = 60  # lines of a function from its def to its end, its docstring included
MAX_MODULE_LINES = 500   # more only with a first line "# Over 500 lines: <reason>"
#: "module:function" allowed to be longer, and why (none today: a new entry needs a reason a reader accepts)
LONG_FUNCTIONS: dict[str, str] = {}


def oversized(files: dict[str, str], allowed: dict[str, str] | None = None) -> list[str]:
    allowed = LONG_FUNCTIONS if allowed is None else allowed
    bad = []
    for name, src in files.items():
        if src.count("\n") > MAX_MODULE_LINES and not src.startswith("# Over 500 lines: "):
            bad.append(f"{name}: {src.count(chr(10))} lines and no reason at its top")
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and f"{name}:{node.name}" not in allowed:
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES:
                    bad.append(f"{name}:{node.lineno} {node.name}: {lines} lines")
    return bad


def test_no_long_function_and_no_long_module_without_a_reason():
    assert oversized({m: p.read_text() for m, p in project_modules().items()}) == []
    long_fn = "def f():\n    '''doc'''\n" + "    x = 1\n" * (MAX_FUNCTION_LINES - 1)
    assert oversized({"m": long_fn}) == ["m:1 f: 61 lines"]  # the def line and the docstring count
    assert oversized({"m": long_fn}, {"m:f": "a reason"}) == []
    assert oversized({"m": "x = 1\n" * (MAX_MODULE_LINES + 1)}) == ["m: 501 lines and no reason at its top"]
    assert oversized({"m": "# Over 500 lines: a reason\n" + "x = 1\n" * MAX_MODULE_LINES}) == []
    functions = {f"{m}:{n.name}" for m, p in project_modules().items() for n in ast.walk(ast.parse(p.read_text()))
                 if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert set(LONG_FUNCTIONS) <= functions, "an entry of LONG_FUNCTIONS names no function: remove it"
