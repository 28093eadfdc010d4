"""The layering rules of docs/architecture.md, enforced on the source (AST, nothing is imported).

(a) HF internals stay behind the adapter: outside `interp/models/`, `interp/attention.py` and
    `kernels/hf.py`, a module imports from transformers only the public top-level names in
    `TRANSFORMERS_NAMES` (type hints), never a submodule, never `import transformers`. The two
    attention seams import only what the attention registration needs (`ATTENTION_SEAM_IMPORTS`);
    `interp/models/` may import anything (loaders, configs, `transformers.utils.logging`).
(b) interp's modules import each other without cycles. Every import counts: module level,
    inside a function, under `if TYPE_CHECKING:` (a type-hint import is still a dependency on
    that layer). Relative imports are resolved; `from . import x` with x a submodule is an
    edge to x; importing `a.b.c` also runs `a.b/__init__`, so it is an edge to the package `a.b`
    too (but not to the root package `interp`, which every module is imported through, nor to a
    package the importer itself lives in); a package `__init__` that re-exports a module has an
    edge to it. The folders circuits/, kernels/ and data/ install as interp.circuits,
    interp.kernels and interp.data, and are named so here.
(c) Outside the same modules, no code reads an HF model's config (`hf_model.config...`), passes
    or reads `past_key_values`, or replaces a module's `forward` (the adapter and
    `interp.models.kv_cache` do these). An import rule cannot see attribute access, so this
    is a separate, name-based check: it looks for the names `hf_model` / `hf` before `.config`.

Known violations in files being changed by others are listed in `KNOWN_*` below, each naming
issue 13. The lists can only shrink: an entry that no longer matches a violation fails the test.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import pytest

ROOT = Path(__file__).resolve().parents[1]
# source folder -> the package it installs as (pyproject.toml's package-dir)
SOURCES = {"interp": "interp", "circuits": "interp.circuits", "kernels": "interp.kernels", "data": "interp.data"}
ROOT_PACKAGE = "interp"

# Where HF internals are allowed (docs/architecture.md: "HF internals live in three places").
HF_SEAMS = ("interp.models", "interp.attention", "interp.kernels.hf")
ATTENTION_SEAMS = ("interp.attention", "interp.kernels.hf")  # for the attention registration only
# what they may import from, besides top-level names (`from transformers import AttentionInterface`)
ATTENTION_SEAM_IMPORTS = ("transformers.masking_utils", "transformers.integrations")
# Public top-level transformers names any module may import, for type hints.
TRANSFORMERS_NAMES = frozenset({"PreTrainedModel", "PreTrainedTokenizerBase"})
HF_MODEL_NAMES = frozenset({"hf_model", "hf"})  # what the toolkit calls an HF model object

# ---------------------------------------------------------------------------- known violations
# Outstanding violations, each with what to change and a comment naming its issue; remove the
# entry with the fix (a stale entry fails the test). All three are empty: the ones issue 13
# found (patching.py's `intermediate_size` read, hooks.py's config reads, the hooks <-> cache
# cycle) are fixed. An entry looks like
#   ("interp.hooks", "interp.cache"): "issue 13: run_with_cache builds an ActivationCache ...",
KNOWN_TRANSFORMERS_IMPORTS: dict[tuple[str, str], str] = {}  # (module, "from transformers import X")
KNOWN_CYCLE_EDGES: dict[tuple[str, str], str] = {}  # (importer, imported): edges that close a cycle
KNOWN_HF_ACCESS: dict[tuple[str, str], str] = {}  # (module, "hf_model.config.<attr>" | ...)


# ---------------------------------------------------------------------------- reading the tree
@dataclass(frozen=True)
class Import:
    module: str  # the importing module
    target: str  # the absolute name imported from (a module, or module.attr for `from m import attr`)
    names: tuple[str, ...]  # the names of a `from` import, () for `import x`
    line: int


def discover(root: Path = ROOT, sources: dict[str, str] = SOURCES) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under the source folders."""
    modules = {}
    for folder, package in sources.items():
        base = root / folder
        for path in sorted(base.rglob("*.py")):
            if "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join([package, *parts])] = path
    return modules


def _package_of(module: str, path: Path) -> str:
    return module if path.name == "__init__.py" else module.rpartition(".")[0]


def imports_of(module: str, path: Path) -> Iterator[Import]:
    """Every import statement of a module, at any depth, with relative names made absolute."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(module, alias.name, (), node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.module == "__future__":
                continue
            if node.level:
                package = _package_of(module, path)
                for _ in range(node.level - 1):
                    package = package.rpartition(".")[0]
                target = f"{package}.{node.module}" if node.module else package
            else:
                target = node.module or ""
            yield Import(module, target, tuple(a.name for a in node.names), node.lineno)


def _known_prefix(name: str, modules: dict[str, Path]) -> Optional[str]:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]  # a.b for a.b.c; never the root


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """importer -> the interp modules it imports (see the module docstring for what counts)."""
    graph: dict[str, set[str]] = defaultdict(set)
    for module, path in modules.items():
        graph[module]
        for imp in imports_of(module, path):
            if imp.target != ROOT_PACKAGE and not imp.target.startswith(ROOT_PACKAGE + "."):
                continue
            targets = [f"{imp.target}.{n}" for n in imp.names if f"{imp.target}.{n}" in modules] or [imp.target]
            if len(targets) < len(imp.names):  # `from pkg import submodule, attribute`: pkg too
                targets.append(imp.target)
            for target in targets:
                found = _known_prefix(target, modules)
                if found is None:
                    raise AssertionError(f"{module}:{imp.line} imports {target!r}, which is not a module of the tree")
                for name in [*_parents(found), found]:
                    inside = module == name or module.startswith(name + ".")
                    if name != module and not (inside and name != found):
                        graph[module].add(name)
    return dict(graph)


def find_cycle(graph: dict[str, set[str]]) -> Optional[list[str]]:
    """One cycle as [m0, m1, ..., m0], or None. Shortest cycle through the first node that has one."""
    for start in sorted(graph):
        previous = {start: None}
        queue = [start]
        while queue:
            node = queue.pop(0)
            for nxt in sorted(graph.get(node, ())):
                if nxt == start:
                    path = [node]  # node, its predecessor, ..., start
                    while previous[path[-1]] is not None:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if nxt not in previous:
                    previous[nxt] = node
                    queue.append(nxt)
    return None


def _in_cycle(graph: dict[str, set[str]], edge: tuple[str, str]) -> bool:
    """Whether `edge` (a, b) lies on a cycle: a is reachable from b."""
    a, b = edge
    seen, stack = {b}, [b]
    while stack:
        node = stack.pop()
        if node == a:
            return True
        for nxt in graph.get(node, ()):
            if nxt not in seen:
                seen.add(nxt)
                stack.append(nxt)
    return False


def _is_seam(module: str) -> bool:
    return any(module == s or module.startswith(s + ".") for s in HF_SEAMS)


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def transformers_violations(modules: dict[str, Path]) -> dict[tuple[str, str], list[int]]:
    """(module, "what it imports") -> lines, for transformers imports the rules above do not allow."""
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for module, path in modules.items():
        if _is_seam(module) and module not in ATTENTION_SEAMS:
            continue
        for imp in imports_of(module, path):
            if not _within(imp.target, ("transformers",)):
                continue
            if module in ATTENTION_SEAMS:
                if not (imp.names and (imp.target == "transformers" or _within(imp.target, ATTENTION_SEAM_IMPORTS))):
                    found[(module, f"{'from' if imp.names else 'import'} {imp.target}")].append(imp.line)
            elif not imp.names:
                found[(module, f"import {imp.target}")].append(imp.line)
            elif imp.target != "transformers":
                found[(module, f"from {imp.target} import ...")].append(imp.line)
            else:
                for name in imp.names:
                    if name not in TRANSFORMERS_NAMES:
                        found[(module, f"from transformers import {name}")].append(imp.line)
    return dict(found)


def _config_read(node: ast.Attribute, parent: Optional[ast.AST]) -> Optional[str]:
    """'hf_model.config.<attr>' when `node` is `<hf>.config` (plain or `x.hf_model.config`)."""
    base = node.value
    name = base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
    if node.attr != "config" or name not in HF_MODEL_NAMES:
        return None
    attr = "*"
    if isinstance(parent, ast.Attribute):
        attr = parent.attr
    elif (isinstance(parent, ast.Call) and isinstance(parent.func, ast.Name) and parent.func.id in ("getattr", "hasattr")
          and len(parent.args) >= 2 and isinstance(parent.args[1], ast.Constant)):
        attr = str(parent.args[1].value)
    return f"hf_model.config.{attr}"


def hf_access_violations(modules: dict[str, Path]) -> dict[tuple[str, str], list[int]]:
    """(module, what) -> lines: HF config reads, `past_key_values`, and `forward` replacement outside the seams."""
    found: dict[tuple[str, str], list[int]] = defaultdict(list)
    for module, path in modules.items():
        if _is_seam(module):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute):
                read = _config_read(node, parents.get(node))
                if read:
                    found[(module, read)].append(node.lineno)
                if node.attr == "past_key_values":
                    found[(module, ".past_key_values")].append(node.lineno)
                if node.attr == "forward" and isinstance(node.ctx, (ast.Store, ast.Del)):
                    found[(module, "replaces a module's .forward")].append(node.lineno)
            elif isinstance(node, ast.keyword) and node.arg == "past_key_values":
                found[(module, "past_key_values=")].append(node.value.lineno)
    return dict(found)


# ---------------------------------------------------------------------------- the rules
@pytest.fixture(scope="module")
def modules() -> dict[str, Path]:
    found = discover()
    # A wrong path would make every rule pass vacuously.
    for name in ("interp", "interp.hooks", "interp.models.adapters", "interp.heads.sinks", "interp.circuits.eap",
                 "interp.circuits.tasks.ioi", "interp.kernels.hf", "interp.data.haystack"):
        assert name in found, f"{name} not found under {ROOT}: the walk is broken"
    return found


def _listing(found: dict[tuple[str, str], list[int]], modules: dict[str, Path]) -> str:
    return "\n".join(
        f"  {modules[m].relative_to(ROOT)}:{','.join(map(str, lines))}  {what}" for (m, what), lines in sorted(found.items())
    )


def split_known(found: dict[tuple[str, str], list[int]], known: dict[tuple[str, str], str]) -> tuple[dict, list]:
    """(violations not in `known`, `known` entries that match no violation any more)."""
    return {k: v for k, v in found.items() if k not in known}, sorted(set(known) - set(found))


def cycle_problems(graph: dict[str, set[str]], known: dict[tuple[str, str], str]) -> list[str]:
    """What is wrong with the import graph, allowing the `known` edges that close a cycle today."""
    missing = sorted(e for e in known if e[1] not in graph.get(e[0], ()))
    if missing:
        return [f"these imports are gone, so remove them from KNOWN_CYCLE_EDGES: {missing}"]
    stale = sorted(e for e in known if not _in_cycle(graph, e))
    if stale:
        return [f"these imports no longer close a cycle, so remove them from KNOWN_CYCLE_EDGES: {stale}"]
    cycle = find_cycle({m: {t for t in targets if (m, t) not in known} for m, targets in graph.items()})
    return ["interp modules import each other in a cycle:\n  " + " -> ".join(cycle)] if cycle else []


def test_transformers_is_imported_only_behind_the_adapter(modules):
    new, stale = split_known(transformers_violations(modules), KNOWN_TRANSFORMERS_IMPORTS)
    assert not new, (
        "transformers imported outside interp/models/, interp/attention.py and kernels/hf.py (allowed elsewhere: "
        f"`from transformers import` {sorted(TRANSFORMERS_NAMES)}):\n{_listing(new, modules)}\n"
        "Ask the adapter (interp/models/) for what you need, or add the operation there."
    )
    assert not stale, f"fixed, so remove from KNOWN_TRANSFORMERS_IMPORTS: {stale}"


def test_interp_modules_import_each_other_without_cycles(modules):
    problems = cycle_problems(import_graph(modules), KNOWN_CYCLE_EDGES)
    assert not problems, "\n".join(problems)


def test_hf_internals_are_not_touched_outside_the_adapter(modules):
    new, stale = split_known(hf_access_violations(modules), KNOWN_HF_ACCESS)
    assert not new, (
        "HF internals outside interp/models/, interp/attention.py and kernels/hf.py:\n"
        f"{_listing(new, modules)}\nUse model.cfg (ModelConfig), the adapter (model.adapter) or interp.models.kv_cache."
    )
    assert not stale, f"fixed, so remove from KNOWN_HF_ACCESS: {stale}"


# ---------------------------------------------------------------------------- the checker itself
def _tree(tmp_path: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        p = tmp_path / "interp" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return discover(tmp_path, {"interp": "interp"})


def test_checker_sees_function_level_type_checking_and_relative_imports(tmp_path):
    modules = _tree(tmp_path, {
        "__init__.py": "from .a import f\n",
        "a.py": "def f():\n    from .pkg import b\n",
        "pkg/__init__.py": "from .c import C\n",
        "pkg/b.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..a import f\n",
        "pkg/c.py": "from .. import a\nimport interp.pkg.b\n",
    })
    graph = import_graph(modules)
    assert graph["interp"] == {"interp.a"}
    assert graph["interp.a"] == {"interp.pkg", "interp.pkg.b"}  # the package's __init__ runs too
    assert graph["interp.pkg"] == {"interp.pkg.c"}  # re-export
    assert graph["interp.pkg.b"] == {"interp.a"}  # under TYPE_CHECKING
    assert graph["interp.pkg.c"] == {"interp.a", "interp.pkg.b"}  # no edge to its own package
    cycle = find_cycle(graph)
    assert cycle is not None and cycle[0] == cycle[-1] and {"interp.a", "interp.pkg.b"} <= set(cycle)
    assert _in_cycle(graph, ("interp.pkg.b", "interp.a")) and not _in_cycle(graph, ("interp", "interp.a"))


def test_checker_finds_no_cycle_in_a_layered_tree_and_a_self_import(tmp_path):
    modules = _tree(tmp_path, {"__init__.py": "", "low.py": "import torch\n", "high.py": "from .low import x\nfrom . import low\n"})
    assert find_cycle(import_graph(modules)) is None
    assert find_cycle({"interp.x": {"interp.x"}}) == ["interp.x", "interp.x"]


def test_checker_flags_transformers_imports_and_hf_access(tmp_path):
    modules = _tree(tmp_path, {
        "__init__.py": "",
        "ok.py": "from transformers import PreTrainedModel\n",
        "bad.py": ("def f(model, hf_model, block, c):\n    import transformers\n    from transformers import DynamicCache\n"
                   "    from transformers.cache_utils import Cache\n    n = model.hf_model.config.intermediate_size\n"
                   "    e = getattr(hf_model.config, 'rms_norm_eps', 1e-6)\n    block.forward = f\n"
                   "    model.hf_model(c, past_key_values=c)\n"),
        "models/__init__.py": "from transformers import DynamicCache\nx = hf_model.config.vocab_size\n",
        "attention.py": ("from transformers import AttentionInterface\nfrom transformers.masking_utils import sdpa_mask\n"
                         "from transformers.integrations.sdpa_attention import f\nfrom transformers.utils import logging\n"),
    })
    imports = transformers_violations(modules)
    assert set(imports) == {("interp.bad", "import transformers"), ("interp.bad", "from transformers import DynamicCache"),
                            ("interp.bad", "from transformers.cache_utils import ..."),
                            ("interp.attention", "from transformers.utils")}
    access = hf_access_violations(modules)
    assert set(access) == {("interp.bad", "hf_model.config.intermediate_size"), ("interp.bad", "hf_model.config.rms_norm_eps"),
                           ("interp.bad", "replaces a module's .forward"), ("interp.bad", "past_key_values=")}


def test_known_lists_only_shrink():
    """A listed violation is tolerated; a new one, or a listed one that is gone, is reported."""
    found = {("interp.a", "x"): [1], ("interp.b", "y"): [2]}
    assert split_known(found, {("interp.a", "x"): "issue 13"}) == ({("interp.b", "y"): [2]}, [])
    assert split_known(found, {("interp.c", "z"): "issue 13"})[1] == [("interp.c", "z")]
    graph = {"interp.a": {"interp.b"}, "interp.b": {"interp.a", "interp.c"}, "interp.c": set()}
    assert cycle_problems(graph, {("interp.b", "interp.a"): "issue 13"}) == []
    assert "interp.a -> interp.b -> interp.a" in cycle_problems(graph, {})[0]
    assert "no longer close a cycle" in cycle_problems(graph, {("interp.b", "interp.a"): "", ("interp.b", "interp.c"): ""})[0]
    assert "are gone" in cycle_problems(graph, {("interp.c", "interp.a"): ""})[0]
