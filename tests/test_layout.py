"""The package's shape: rooms import only downwards, no module imports itself round a circle (imports inside
functions count), and an import inside a function says why it is there."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "align"
# top to bottom: a room may import from the rooms below it, never from one above
ROOMS = ["cli", "loop", "evaluation", "stages", "serving", "data", "modeling", "rl", "runtime"]


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports_of(name: str, path: Path, known: set[str]) -> list[tuple[str, int, bool]]:
    """(imported align module, line, inside a function) for every import in the file."""
    tree = ast.parse(path.read_text())
    in_function = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from align.stages import sft` imports the module align.stages.sft
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        for target in targets:
            if target.split(".")[0] == "align":
                while target not in known and "." in target:
                    target = target.rsplit(".", 1)[0]
                found.append((target, node.lineno, id(node) in in_function))
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {t for t, _, _ in imports_of(name, path, set(mods)) if t != name} for name, path in mods.items()}


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_find_cycle_sees_a_circle_through_three_modules():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_imports_inside_functions_are_seen(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("import os\n\ndef f():\n    from align.rl import losses\n    return losses\n")
    assert imports_of("align.x.mod", path, {"align.rl.losses", "align.rl"}) == [("align.rl.losses", 4, True)]


def test_no_import_cycles_counting_imports_inside_functions():
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_every_module_lives_in_a_room():
    loose = [m for m in modules() if m.count(".") == 1 and m.split(".")[1] not in ROOMS + ["__main__"]]
    assert not loose, f"modules outside the rooms {ROOMS}: {loose}"


@pytest.mark.parametrize("upper", ROOMS)
def test_rooms_import_only_downwards(upper):
    above = set(ROOMS[:ROOMS.index(upper)])
    wrong = sorted(f"{m} -> {t}" for m, targets in graph().items() if room(m) == upper
                   for t in targets if room(t) in above)
    assert not wrong, f"{upper} reaches up: {wrong}"


def test_an_import_inside_a_function_says_why():
    """Imports of the package's own modules belong at the top of the file; one inside a function is only there to
    keep a heavy dependency off the start-up path, and a comment on its line or the line above says so."""
    mods = modules()
    unexplained = []
    for name, path in mods.items():
        lines = path.read_text().splitlines()
        for target, line, inside in imports_of(name, path, set(mods)):
            if inside and not explained(lines, line):
                unexplained.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {target}")
    assert not unexplained, "\n".join(sorted(set(unexplained)))


def explained(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or above the block of imports it stands in."""
    if "#" in lines[line - 1]:
        return True
    i = line - 2
    while i >= 0 and lines[i].strip().startswith(("from ", "import ")):
        i -= 1
    return i >= 0 and lines[i].strip().startswith("#")


def test_a_comment_above_a_block_of_imports_explains_each():
    lines = ["def f():", "    # heavy: torch", "    from align.rl import losses", "    from align.rl import advantages",
             "", "    from align.data import rows"]
    assert explained(lines, 3) and explained(lines, 4) and not explained(lines, 6)


def test_help_loads_no_model_library():
    """`align --help` and every verb's --help describe their keys without importing torch, transformers or the
    stages (the pipeline's settings live in align/loop/settings.py for this): help is instant."""
    import subprocess
    import sys

    code = ("import sys\nfrom align.cli.main import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'trl', 'align.stages.sft') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
