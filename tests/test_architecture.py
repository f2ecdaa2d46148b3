"""The package's layout, read from its own imports: floors that import only downward, no import circle, a light
service and a public face (docs/architecture.md)."""

import ast
import subprocess
import sys
from pathlib import Path

import de3bert

PACKAGE = Path(de3bert.__file__).parent
FLOORS = {  # a module may import its own room and lower floors only; the core's rooms each other (docs/architecture.md)
    "errors": 0, "devices": 0, "atomic": 0, "digests": 0, "knobs": 0, "data": 0,
    "model": 1,
    "exits": 2,
    "training": 3, "evaluation": 3, "onnx": 3,
    "apps": 4,
}
FACE = ("__init__", "__main__")  # the public names and `python -m de3bert`: above everything


def module_name(path: Path) -> str:
    """The dotted name of a module file of the package."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """Every de3bert module a file imports, anywhere in it (functions and TYPE_CHECKING blocks included); `from
    package import submodule` counts as importing the submodule."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("de3bert"):
            names.update(f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                         for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names if alias.name.startswith("de3bert"))
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the de3bert modules it imports."""
    paths = list(PACKAGE.rglob("*.py"))
    modules = {module_name(path) for path in paths}
    return {module_name(path): imported_modules(path, modules) for path in paths}


def room(module: str) -> str:
    """The top-level room (package or core module) a module lives in."""
    return module.split(".")[1] if "." in module else "__init__"


def test_every_room_has_a_floor():
    rooms = {room(module) for module in import_graph()} - set(FACE)
    assert rooms == set(FLOORS), "a new package or core module: give it a floor here and in docs/architecture.md"


def test_imports_run_downward_only():
    upward = [f"{module} imports {target}" for module, targets in import_graph().items() if room(module) not in FACE
              for target in targets
              if room(target) != room(module) and FLOORS[room(target)] >= max(1, FLOORS[room(module)])]
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = import_graph()
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                raise AssertionError("import circle: " + " -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])


def test_the_service_loads_neither_scikit_learn_nor_matplotlib():
    code = ("import sys, de3bert.apps.serving; "
            "print(sorted(m for m in ('sklearn', 'matplotlib') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]"


def test_the_public_names_import_from_the_package():
    from de3bert import (CRITERIA, EarlyExitEngine, EarlyExitModel, ExitPolicy, TrainingArguments, load_model, resume,
                         train)
    from de3bert.apps.runtimes import load_model as runtime_load_model
    from de3bert.exits.engine import EarlyExitEngine as engine_class

    assert EarlyExitEngine is engine_class and load_model is runtime_load_model
    assert callable(train) and callable(resume) and isinstance(EarlyExitModel, type)
    assert ExitPolicy().criterion in CRITERIA and TrainingArguments(output_dir="x").recipe == "de3"
    assert set(de3bert.__all__) <= set(dir(de3bert))


def test_criterion_names_are_written_only_in_the_registry():
    """Outside exits/criteria.py no module spells a criterion's name as a string of its own (keys of dicts and
    subscripts aside: indicators share names with criteria, and "patience" is a policy's field too)."""
    from de3bert.exits.criteria import CRITERIA
    from de3bert.exits.policies import ExitPolicy

    names = set(CRITERIA) - set(ExitPolicy.__dataclass_fields__)
    registry = PACKAGE / "exits" / "criteria.py"
    written = []
    for path in PACKAGE.rglob("*.py"):
        if path == registry:
            continue
        tree = ast.parse(path.read_text())
        keys = {id(key) for node in ast.walk(tree) if isinstance(node, ast.Dict) for key in node.keys}
        keys |= {id(node.slice) for node in ast.walk(tree) if isinstance(node, ast.Subscript)}
        written += [f"{path.relative_to(PACKAGE)}:{node.lineno} '{node.value}'" for node in ast.walk(tree)
                    if isinstance(node, ast.Constant) and node.value in names and id(node) not in keys]
    assert not written, "\n".join(written)
