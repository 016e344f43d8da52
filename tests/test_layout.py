"""The layers hold (README, Architecture): walks grpo_ds's import graph with ast.

- the trainer and train.py never import the tools;
- no math module imports deepspeed or the config;
- no import cycles inside grpo_ds (imports inside functions count: they run too; those under
  `if TYPE_CHECKING:` do not).
"""

import ast
from pathlib import Path

import grpo_ds

ROOT = Path(grpo_ds.__file__).parent
MATH = ("grpo_ds.loss", "grpo_ds.loss_variants", "grpo_ds.advantages", "grpo_ds.logprobs")
TRAINER = ("grpo_ds.train", "grpo_ds.trainer", "grpo_ds.warmup")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module `path` imports, absolute, with `from pkg import mod` resolved to pkg.mod."""
    found = set()
    tree = ast.parse(path.read_text())
    for block in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run: leave them out
        if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING":
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in ROOT.rglob("*.py")}
    return {name: {m for m in imports_of(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_the_trainer_never_imports_the_tools():
    edges = graph()
    for name in TRAINER:
        assert not [m for m in edges[name] if m.startswith("grpo_ds.tools")], name


def test_math_imports_neither_deepspeed_nor_config():
    for name in MATH:
        path = ROOT / (name.split(".")[-1] + ".py")
        bad = [m for m in imports_of(path) if m.split(".")[0] == "deepspeed"
               or m.startswith("grpo_ds.config")]
        assert not bad, f"{name} imports {bad}"


def test_no_import_cycles():
    edges = graph()
    # a package's __init__ importing its own submodules is not a cycle of layers
    edges = {n: {m for m in deps if not (m.startswith(n + ".") or n.startswith(m + "."))}
             for n, deps in edges.items()}
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path + [node, nxt]))
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name, [])


# The benchmarks that time or measure whole GRPO steps build through grpo_ds.build, as train.py
# does; the pieces build.py wires must not be wired again in them.
STEP_BENCHES = ("grpo_ds.tools.bench.step_worker", "grpo_ds.tools.bench.memory_worker")
WIRING = ("grpo_ds.engine.build_policy", "grpo_ds.engine.build_reference",
          "grpo_ds.engine.load_sharded",
          "grpo_ds.rollout.HybridRollout", "grpo_ds.rollout.engine.HybridRollout",
          "grpo_ds.rollout.select.build_rollout", "grpo_ds.lora.add_adapters")


def test_step_benches_build_through_the_builder():
    for name in STEP_BENCHES:
        found = imports_of(ROOT / "tools" / "bench" / (name.split(".")[-1] + ".py"))
        assert "grpo_ds.build" in found, name
        assert not found & set(WIRING), f"{name} wires {sorted(found & set(WIRING))} itself"


def test_files_and_functions_stay_small():
    """STYLE.md: files under about 400 lines, functions under about 60 (decorators excluded)."""
    long_files, long_functions = [], []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if text.count("\n") > 400:
            long_files.append(f"{path.name}: {text.count(chr(10))}")
        for node in ast.walk(ast.parse(text)):
            functions = (ast.FunctionDef, ast.AsyncFunctionDef)
            if isinstance(node, functions) and node.end_lineno - node.lineno + 1 > 60:
                long_functions.append(f"{path.name}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)
