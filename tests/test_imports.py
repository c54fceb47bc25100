"""The shape of the package, read from its source (ast), so that it cannot drift back:

- layers, bottom to top (docs/modules.md): a module imports only from its own layer or lower ones;
- nothing in the library imports the command line (npgpt.cli), but for the hand-over in a
  command module's `if __name__ == "__main__":` block;
- no import cycles, counting imports inside functions too;
- the textbook imports nothing but NumPy and the standard library, and runs without Numba.
"""
import ast
import pathlib
import subprocess
import sys

import pytest

from helpers import REPO

PKG = REPO / "npgpt"

LAYERS = [
    ("base", {"npgpt.errors", "npgpt.progress", "npgpt.runtime", "npgpt.userpaths"}),
    ("textbook", {"npgpt.config", "npgpt.ops", "npgpt.model", "npgpt.optim", "npgpt.lora"}),
    ("fast paths", {"npgpt.kernels", "npgpt.fastops", "npgpt.fastmodel", "npgpt.prefix_tree", "npgpt.prefix",
                    "npgpt.infer", "npgpt.generate", "npgpt.flops"}),
    ("files", {"npgpt.fileio", "npgpt.h5vlen", "npgpt.h5read", "npgpt.params", "npgpt.checkpoint", "npgpt.tfcheckpoint", "npgpt.safetensors_io",
               "npgpt.download", "npgpt.weights", "npgpt.prefix_cache", "npgpt.prefix_shards"}),
    ("data", {"npgpt.tokenizer", "npgpt.data", "npgpt.tabular", "npgpt.dataset"}),
    ("training and using", {"npgpt.runconfig", "npgpt.runs", "npgpt.finetune", "npgpt.job", "npgpt.train",
                            "npgpt.classify", "npgpt.explain", "npgpt.predictions", "npgpt.evaluate", "npgpt.api", "npgpt.estimator", "npgpt.plots",
                            "npgpt.batcher", "npgpt.http_api", "npgpt.serve",
                            "npgpt.distributed", "npgpt.corpus", "npgpt"}),
    ("command line", {"npgpt.__main__", "npgpt.cache"}),     # and every npgpt.cli module
]
TEXTBOOK_THIRD_PARTY = {"numpy"}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer_of(name: str) -> int:
    if name == "npgpt.cli" or name.startswith("npgpt.cli."):
        return len(LAYERS) - 1
    for k, (_, members) in enumerate(LAYERS):
        if name in members:
            return k
    raise AssertionError(f"{name} is in no layer of tests/test_imports.py (add it where it belongs)")


def _is_main_block(node) -> bool:
    """`if __name__ == "__main__":`"""
    t = node.test if isinstance(node, ast.If) else None
    return (isinstance(t, ast.Compare) and isinstance(t.left, ast.Name) and t.left.id == "__name__"
            and len(t.comparators) == 1 and isinstance(t.comparators[0], ast.Constant)
            and t.comparators[0].value == "__main__")


def imports_of(name: str):
    """(npgpt modules, top-level third-party packages) that module `name` imports anywhere but in
    its `if __name__ == "__main__":` blocks."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    inner, outer = set(), set()

    def visit(node):
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            for a in node.names:
                (inner if a.name.split(".")[0] == "npgpt" else outer).add(a.name if a.name.startswith("npgpt")
                                                                         else a.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            if target.split(".")[0] != "npgpt":
                outer.add(target.split(".")[0])
            else:
                for a in node.names:
                    sub = f"{target}.{a.name}"
                    inner.add(sub if sub in MODULES else target)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    inner.discard(name)
    return inner, outer


GRAPH = {name: imports_of(name)[0] for name in MODULES}


def test_every_module_has_a_layer():
    for name in MODULES:
        layer_of(name)
    assert set(GRAPH) == set(MODULES) and len(MODULES) > 40


def test_imports_go_down_the_layers():
    wrong = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
             for a, targets in GRAPH.items() for b in sorted(targets) if layer_of(b) > layer_of(a)]
    assert not wrong, "\n".join(wrong)


def test_nothing_in_the_library_imports_the_command_line():
    wrong = [f"{a} imports {b}" for a, targets in GRAPH.items() if layer_of(a) < len(LAYERS) - 1
             for b in targets if b == "npgpt.cli" or b.startswith("npgpt.cli.")]
    assert not wrong, wrong


def find_cycle(graph):
    """One import cycle as a list of modules, or None."""
    state, stack = {}, []

    def dfs(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state:
                found = dfs(v)
                if found:
                    return found
        state[u] = "done"
        stack.pop()
        return None

    for u in sorted(graph):
        if u not in state:
            found = dfs(u)
            if found:
                return found
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, " -> ".join(cycle)


def test_the_checks_can_fail():
    """The cycle finder finds a planted cycle, and the layer rule sees a planted upward import."""
    planted = {k: set(v) for k, v in GRAPH.items()}
    planted["npgpt.ops"].add("npgpt.model")                   # model imports ops: now a cycle
    assert find_cycle(planted) is not None
    assert layer_of("npgpt.ops") < layer_of("npgpt.train")
    assert imports_of("npgpt.train")[0] >= {"npgpt.finetune", "npgpt.runconfig"}
    assert "npgpt.cli" not in imports_of("npgpt.train")[0]   # its __main__ block is left out...
    assert "npgpt.cli" in {t for t in imports_of("npgpt.cli.train")[0] if t == "npgpt.cli"}   # ...a real one is seen


def test_the_textbook_imports_numpy_alone():
    textbook = LAYERS[1][1] | {"npgpt.errors"}
    wrong = {n: sorted(imports_of(n)[1] - TEXTBOOK_THIRD_PARTY - set(sys.stdlib_module_names))
             for n in textbook}
    assert not any(wrong.values()), wrong


@pytest.mark.parametrize("code", [
    # the textbook: numba cannot even be imported
    "import numpy as np; from npgpt import config, model, optim, lora; "
    "cfg = config.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_ctx=8); "
    "p = config.init_params(cfg, num_classes=2); lora.add_lora(p, cfg, 2); "
    "loss, g, _ = model.loss_and_grads(p, cfg, np.array([[1, 2, 3]]), np.array([1]), trainable='lora', "
    "lora=lora.LoraSpec(2, 2.0)); optim.AdamW().step(p, g); "
    "assert 'numba' not in sys.modules or sys.modules['numba'] is None; print('ok', loss)",
    # the fast paths with NPGPT_NUMBA=0: NumPy throughout, numba never needed
    "import os; os.environ['NPGPT_NUMBA'] = '0'; import numpy as np; from npgpt import config, fastmodel; "
    "cfg = config.GPT2Config(n_layer=2, n_head=2, n_embd=8, vocab_size=11, n_ctx=8); "
    "p = config.init_params(cfg, num_classes=2); "
    "loss, g, _ = fastmodel.loss_and_grads(p, cfg, np.array([[1, 2, 3]]), np.array([1])); print('ok', loss)",
])
def test_runs_without_numba(code, tmp_path):
    blocked = "import sys; sys.modules['numba'] = None; "         # `import numba` raises ImportError
    r = subprocess.run([sys.executable, "-c", blocked + code], cwd=tmp_path, capture_output=True, text=True,
                       env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok"), r.stderr
