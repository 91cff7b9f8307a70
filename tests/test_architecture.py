"""The package's shape, checked from its source: no import cycle anywhere in minipeft (built with ast from
every import, the ones inside functions included), no file in minipeft/ or tools/ within 20 lines of the 400-line
limit, the plain training loop under 300, model.py free of PEFT, the PEFT package free of family modules, and
no `family == "..."` test outside a family's own files (the family record says it instead)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minipeft"
TOOLS = PACKAGE.parent / "tools"
# A family's own files: its decoder, its tokenizer rules and its Hugging Face name table.
FAMILY_FILES = ("model.py", "bloom.py", "chatglm.py", "tokenizer_chatglm.py", "checkpoint/hf_llama.py",
                "checkpoint/hf_bloom.py", "checkpoint/hf_chatglm.py", "checkpoint/hf_glm.py")
FAMILY_MODULES = ("minipeft.model", "minipeft.bloom", "minipeft.chatglm", "minipeft.tokenizer_chatglm",
                  "minipeft.checkpoint.hf_llama", "minipeft.checkpoint.hf_bloom", "minipeft.checkpoint.hf_chatglm",
                  "minipeft.checkpoint.hf_glm")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def resolve(importer: str, is_package: bool, level: int, target) -> str:
    """The absolute module an import names (relative ones resolved against the importer)."""
    if level == 0:
        return target or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def import_graph() -> dict:
    """module -> set of minipeft modules it imports (`from X import name` of a submodule counts as X.name)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: set() for name in modules}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                source = resolve(name, is_package, node.level, node.module)
                submodules = [f"{source}.{alias.name}" for alias in node.names if f"{source}.{alias.name}" in modules]
                # `from . import lora` imports the module lora; `from .config import X` imports config
                targets = submodules if len(submodules) == len(node.names) else [source] + submodules
            for target in targets:
                if target in modules and target != name:
                    graph[name].add(target)
    return graph


def find_cycle(graph: dict):
    """A list of modules forming a cycle, or None (depth-first search with colours)."""
    colour, stack = {}, []

    def visit(node):
        colour[node] = "grey"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour.get(nxt) == "grey":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in colour:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        colour[node] = "black"
        return None

    for node in sorted(graph):
        if node not in colour:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_import_graph_sees_relative_and_late_imports():
    graph = import_graph()
    assert "minipeft.peft.config" in graph["minipeft.peft.lora"]            # from .config import ...
    assert "minipeft.checkpoint" in graph["minipeft.peft.save_load"]        # a late import inside a function


def test_no_import_cycle_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The code of the tools (the comparison, pretraining) sits on top: it may import minipeft.train and minipeft.peft,
# and nothing else in the package imports it.
TOOL_PACKAGES = ("minipeft.compare", "minipeft.pretrain")


def test_dependencies_flow_one_way():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith(TOOL_PACKAGES):
            continue
        assert not any(t.startswith(TOOL_PACKAGES) for t in imported), name
        if name.startswith("minipeft.peft"):
            assert not any(t.startswith("minipeft.train") for t in imported), name
        if not name.startswith(("minipeft.train", "minipeft.peft")) and name != "minipeft":
            assert not any(t.startswith(("minipeft.train", "minipeft.peft")) for t in imported), name


def test_the_package_imports_nothing_from_tools_or_lessons():
    """tools/ and lessons/ are not packages: importing one of their modules works only through a sys.path edit,
    and the package makes none."""
    scripts = {p.stem for folder in ("tools", "lessons") for p in (PACKAGE.parent / folder).rglob("*.py")}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names = [node.module]
            else:
                names = []
            assert not [n for n in names if n.split(".")[0] in scripts], (str(path), names)
            is_sys_path = isinstance(node, ast.Attribute) and node.attr == "path" and getattr(node.value, "id", "") == "sys"
            assert not is_sys_path, f"{path}: edits sys.path"


def test_file_sizes():
    """400 lines is a smell detector, not a target: a file near it holds two ideas (split it by idea)."""
    files = list(PACKAGE.rglob("*.py")) + list(TOOLS.rglob("*.py"))
    long = {str(p.relative_to(PACKAGE.parent)): n for p in files if (n := len(p.read_text().splitlines())) > 380}
    assert not long, f"files within 20 lines of the 400-line limit: {long}"
    loop_lines = len((PACKAGE / "train" / "loop.py").read_text().splitlines())
    assert loop_lines < 300, loop_lines


def family_string_tests(source: str, filename: str) -> list:
    """Lines of `source` that compare something named *family* with a string (== / != / in a tuple of strings)."""
    found = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if not isinstance(node, ast.Compare):
            continue
        sides = [node.left] + node.comparators
        names = [s.id if isinstance(s, ast.Name) else s.attr if isinstance(s, ast.Attribute) else "" for s in sides]
        strings = [s for s in sides if isinstance(s, ast.Constant) and isinstance(s.value, str)
                   or isinstance(s, (ast.Tuple, ast.List, ast.Set))
                   and any(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in s.elts)]
        if any("family" in name for name in names) and strings:
            found.append(f"{filename}:{node.lineno}")
    return found


def test_the_family_test_finder_finds_one():
    planted = ('if cfg.family == "bloom":\n    pass\nif family in ("llama", "chatglm2"):\n    pass\n'
               'ok = family is None or family in (None, other.family)\n')
    assert family_string_tests(planted, "x.py") == ["x.py:1", "x.py:3"]


def test_no_family_string_test_outside_the_family_files():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")) + sorted(TOOLS.rglob("*.py")):
        if path.is_relative_to(PACKAGE) and str(path.relative_to(PACKAGE)) in FAMILY_FILES:
            continue
        found += family_string_tests(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert not found, f"ask the family record (minipeft/family_registry.py) instead: {found}"


def test_the_peft_package_imports_no_family_module():
    graph = import_graph()
    for name, imported in graph.items():
        if name.startswith("minipeft.peft"):
            assert not imported & set(FAMILY_MODULES), (name, sorted(imported & set(FAMILY_MODULES)))


def test_model_knows_no_peft():
    """model.py: no import from the PEFT package and no method named in its code (its docstring may)."""
    assert not any(t.startswith("minipeft.peft") for t in import_graph()["minipeft.model"])
    code = (PACKAGE / "model.py").read_text().split('"""', 2)[2].lower()      # after the module docstring
    for word in ("peft", "lora", "adapter", "soft_prompt"):
        assert word not in code, word
