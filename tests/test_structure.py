"""The code has one way through it: short functions, no import cycle, loss names in one place."""
import ast
from pathlib import Path

import mio_kernels
from mio_kernels.losses import LOSSES

PACKAGE = Path(mio_kernels.__file__).parent
MAX_LINES, MAX_KERNEL_LINES = 60, 80


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(("mio_kernels",) + path.relative_to(PACKAGE).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path, ast.parse(path.read_text())


def is_triton_kernel(node) -> bool:
    return any("jit" in ast.unparse(d) for d in node.decorator_list)


def test_no_function_over_the_limit():
    long = []
    for name, _, tree in modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > (MAX_KERNEL_LINES if is_triton_kernel(node) else MAX_LINES):
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, long


def module_imports(tree, name, known):
    """mio_kernels modules imported at module level (imports inside functions are deferred on purpose)."""
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            base = node.module
            if node.level:  # relative import
                base = ".".join(name.split(".")[:-node.level] + [node.module])
            found |= {base} | {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_no_import_cycle():
    trees = {name: tree for name, _, tree in modules()}
    graph = {name: module_imports(tree, name, trees) for name, tree in trees.items()}
    # A package's __init__ re-exporting its submodules is not a cycle through them.
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state = {}

    def visit(node, path):
        state[node] = "open"
        for dep in graph[node]:
            assert state.get(dep) != "open", "import cycle: " + " -> ".join(path + [dep])
            if dep not in state:
                visit(dep, path + [dep])
        state[node] = "done"

    for node in graph:
        if node not in state:
            visit(node, [node])


def test_loss_names_only_in_losses_py():
    # integrations/ maps a peer's loss names onto ours, so it names ours by design.
    found = []
    for name, path, tree in modules():
        if name == "mio_kernels.losses" or ".integrations" in name:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in LOSSES:
                found.append(f"{name}:{node.lineno} {node.value!r}")
    assert not found, found
