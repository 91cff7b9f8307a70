"""`# Copied from minipeft.model.<name>` markers: bloom.py and chatglm.py repeat some of model.py's functions word
for word, so each decoder file reads alone top to bottom (the single-file policy of DESIGN.md); this test keeps
every marked copy equal to its source, the idea of Hugging Face transformers' utils/check_copies.py.

A marker is a comment line directly above a `def` or `class` (or its first decorator):

    # Copied from minipeft.model.Transformer.forward_layers
    # Copied from minipeft.model.Attention.forward with cos, sin->rotation; Attention->BloomAttention

The marked block (the whole function or class, from its first decorator to its last line) must equal the named
source's text once the replacements, `old->new` separated by `;` (code holds commas, so `,` cannot separate),
are applied to the source in order. Indentation is compared after dedenting both, so a module-level function
may be the copy of a method and the other way round. Comments and docstrings count: a copy is the same text.
"""

import ast
import re
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "minipeft"
MARKER = re.compile(r"^\s*# Copied from (?P<target>minipeft(?:\.\w+)+)(?: with (?P<replacements>.+?))?\s*$")

# The copies the decoders are known to carry: a marker deleted by mistake fails here, not silently.
EXPECTED_COPIES = {
    "bloom.py": {"Attention.forward", "Block.forward", "Transformer.embed", "Transformer.past_length",
                 "Transformer.forward_layers", "Transformer.num_parameters", "widen_attention_mask"},
    "chatglm.py": {"Attention.forward", "Transformer.embed", "Transformer.past_length",
                   "Transformer.forward_layers", "Transformer.num_parameters", "widen_attention_mask"},
}


def parse_replacements(text):
    """'a->b; c, d->e' -> [('a', 'b'), ('c, d', 'e')]."""
    if not text:
        return []
    pairs = []
    for item in text.split(";"):
        if "->" not in item:
            raise ValueError(f"replacement {item.strip()!r} is not old->new")
        old, new = item.split("->", 1)
        pairs.append((old.strip(), new.strip()))
    return pairs


def block_starting_at(tree, line):
    """The def/class whose first line (its first decorator's, if any) is `line`, or None."""
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
            if first == line:
                return node, first
    return None


def find_definition(tree, qualname):
    """The def/class named by a dotted path inside a module ('Transformer.forward_layers'), or None."""
    scope = tree.body
    node = None
    for part in qualname.split("."):
        node = next((n for n in scope if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     and n.name == part), None)
        if node is None:
            return None
        scope = node.body
    return node


def block_text(lines, node):
    first = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    return first, textwrap.dedent("".join(lines[first - 1:node.end_lineno]))


def resolve_source(target, package_dir):
    """'minipeft.model.Transformer.embed' -> (package_dir/model.py, 'Transformer.embed'): the longest module
    prefix that is a file under package_dir."""
    parts = target.split(".")[1:]                                   # drop the package name
    for cut in range(len(parts) - 1, 0, -1):
        path = package_dir.joinpath(*parts[:cut]).with_suffix(".py")
        if path.is_file():
            return path, ".".join(parts[cut:])
    return None, None


def check_file(path, package_dir=PACKAGE):
    """Every marked copy in `path` against its source -> (list of problem messages, list of targets checked)."""
    path = Path(path)
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    tree = ast.parse(text, filename=str(path))
    problems, targets = [], []
    for index, line in enumerate(lines, start=1):
        match = MARKER.match(line)
        if not match:
            continue
        where = f"{path}:{index}"
        target = match["target"]
        targets.append(target)
        found = block_starting_at(tree, index + 1)
        if found is None:
            problems.append(f"{where}: the marker '# Copied from {target}' is not directly above a def or class")
            continue
        source_path, qualname = resolve_source(target, package_dir)
        if source_path is None:
            problems.append(f"{where}: no module for {target} under {package_dir}")
            continue
        source_text = source_path.read_text()
        source_node = find_definition(ast.parse(source_text, filename=str(source_path)), qualname)
        if source_node is None:
            problems.append(f"{where}: {target} names nothing in {source_path}")
            continue
        source_first, expected = block_text(source_text.splitlines(keepends=True), source_node)
        try:
            replacements = parse_replacements(match["replacements"])
        except ValueError as error:
            problems.append(f"{where}: {error}")
            continue
        for old, new in replacements:
            expected = expected.replace(old, new)
        copy_first, got = block_text(lines, found[0])
        if got != expected:
            problems.append(describe_drift(path, copy_first, got, source_path, source_first, expected, target))
    return problems, targets


def describe_drift(path, copy_first, got, source_path, source_first, expected, target):
    """The first line where a copy and its (replaced) source part, with both files' line numbers."""
    got_lines, expected_lines = got.splitlines(), expected.splitlines()
    for offset in range(max(len(got_lines), len(expected_lines))):
        mine = got_lines[offset] if offset < len(got_lines) else "<the copy ends here>"
        theirs = expected_lines[offset] if offset < len(expected_lines) else "<the source ends here>"
        if mine != theirs:
            break
    return (f"{path}:{copy_first + offset}: the copy of {target} drifted from {source_path}:{source_first + offset}\n"
            f"    copy:   {mine.strip()}\n    source: {theirs.strip()}\n"
            f"  make the copy the source's text again (or change the source and every copy, or the marker)")


def test_marked_copies_match_their_source():
    problems, checked = [], {}
    for path in sorted(PACKAGE.rglob("*.py")):
        found, targets = check_file(path)
        problems += found
        if targets:
            checked[path.name] = {t.split(".", 2)[2] for t in targets}
    assert not problems, "\n".join(problems)
    for name, expected in EXPECTED_COPIES.items():
        missing = expected - checked.get(name, set())
        assert not missing, f"minipeft/{name} lost its copy markers of minipeft.model.{sorted(missing)}"


def test_a_drifted_copy_is_caught(tmp_path):
    """The check can fail: bloom.py with one changed line inside a marked copy is reported at that line."""
    text = (PACKAGE / "bloom.py").read_text()
    original = "                h, kv = layer(h, rotation, mask, past_kv)\n"
    assert text.count(original) == 1
    drifted = tmp_path / "bloom.py"
    drifted.write_text(text.replace(original, "                h, kv = layer(h, None, mask, past_kv)\n"))
    problems, _ = check_file(drifted)
    line = text[:text.index(original)].count("\n") + 1
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{drifted}:{line}: the copy of minipeft.model.Transformer.forward_layers drifted")
    assert "copy:   h, kv = layer(h, None, mask, past_kv)" in problems[0]
    assert "source: h, kv = layer(h, rotation, mask, past_kv)" in problems[0]
    assert f"{PACKAGE / 'model.py'}:" in problems[0]


def test_replacements_missing_sources_and_stray_markers(tmp_path):
    (tmp_path / "model.py").write_text(
        "class Net:\n"
        "    def step(self, x, cos, sin):\n"
        "        return self.rotate(x, cos, sin)  # Net\n")
    (tmp_path / "sibling.py").write_text(
        "class Other:\n"
        "    # Copied from minipeft.model.Net.step with cos, sin->bias; Net->Other\n"
        "    def step(self, x, bias):\n"
        "        return self.rotate(x, bias)  # Other\n"
        "\n"
        "\n"
        "# Copied from minipeft.model.Net.step\n"
        "def step(self, x, cos, sin):\n"
        "    return self.rotate(x, cos, sin)  # Net\n"
        "\n"
        "\n"
        "# Copied from minipeft.model.Net.jump\n"
        "def jump():\n"
        "    pass\n"
        "# Copied from minipeft.model.Net.step\n"
        "\n"
        "x = 1\n")
    problems, targets = check_file(tmp_path / "sibling.py", package_dir=tmp_path)
    assert len(targets) == 4
    assert len(problems) == 2, problems                   # the replaced copy and the method-as-function pass
    assert problems[0].startswith(f"{tmp_path / 'sibling.py'}:12: minipeft.model.Net.jump names nothing")
    assert problems[1].startswith(f"{tmp_path / 'sibling.py'}:15: the marker") and "not directly above" in problems[1]

    (tmp_path / "sibling.py").write_text(
        "# Copied from minipeft.model.Net.step with cos, sin->bias\n"
        "def step(self, x, bias):\n"
        "    return self.rotate(x, bias)  # Other\n")
    problems, _ = check_file(tmp_path / "sibling.py", package_dir=tmp_path)
    assert len(problems) == 1
    assert problems[0].startswith(f"{tmp_path / 'sibling.py'}:3: the copy of minipeft.model.Net.step drifted")
    assert "# Other" in problems[0] and "# Net" in problems[0]
