"""The layout holds: imports follow the architecture, and a Flower node holds only its own client."""

import ast
import pickle
from pathlib import Path

import pytest

import sfedlora
from sfedlora.data import load_task
from sfedlora.federated.federation import build_node

PACKAGE = Path(sfedlora.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """The sfedlora modules ``path`` imports, anywhere in it: under ``if TYPE_CHECKING`` too,
    since an annotation's import is a dependency all the same."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            # ``from x import y``: the module x.y where there is one, else x itself.
            candidates = [
                f"{target}.{a.name}" if module_path(f"{target}.{a.name}") else target for a in node.names
            ]
        elif isinstance(node, ast.Import):
            candidates = [a.name for a in node.names]
        else:
            continue
        out |= {c for c in candidates if c.startswith("sfedlora") and module_path(c) is not None}
    return out


def module_path(name: str) -> Path | None:
    rel = Path(*name.split("."))
    for p in (PACKAGE.parent / rel.with_suffix(".py"), PACKAGE.parent / rel / "__init__.py"):
        if p.is_file():
            return p
    return None


GRAPH = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def reachable(start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in GRAPH.get(todo.pop(), ()):
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_import_graph_is_read_correctly():
    # A check of the checker: known edges are found, so the rules below can fail.
    assert "sfedlora.federated.client" in GRAPH["sfedlora.engine.executors"]
    assert "sfedlora.federated.federation" in GRAPH["sfedlora.flower.client_app"]
    assert "sfedlora.data.examples" in GRAPH["sfedlora.data.loading"]


def test_no_import_cycles():
    cyclic = sorted(m for m in GRAPH if m in reachable(m))
    assert not cyclic, f"modules on an import cycle: {cyclic}"


def package_of(module: str) -> str:
    """The layer a module belongs to: its first folder under sfedlora (top-level modules are their own)."""
    return module.split(".")[1] if module.count(".") >= 1 else module


# Which packages each layer may not import: lower layers never reach higher ones.
FORBIDDEN = {
    "lora": {"federated", "engine", "flower", "driver", "results", "cli"},
    "tasks": {"federated", "engine", "flower", "driver", "results", "cli"},
    "federated": {"engine", "flower", "driver", "results", "cli"},
    "engine": {"flower", "driver", "results", "cli"},
    "flower": {"engine", "results", "cli"},
    "driver": {"results", "cli"},
    "results": {"cli"},
    "config": {"engine", "flower", "driver", "results", "cli"},
    "privacy": {"engine", "flower", "driver", "results", "cli"},
}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_packages_are_layers(layer):
    bad = {
        (m, t) for m in GRAPH if package_of(m) == layer for t in GRAPH[m] if package_of(t) in FORBIDDEN[layer]
    }
    assert not bad, f"{layer}/ imports a layer above it: {sorted(bad)}"


def test_nothing_imports_the_cli():
    assert not {m for m in GRAPH if package_of(m) != "cli" and any(package_of(t) == "cli" for t in GRAPH[m])}


def test_runtimes_stand_side_by_side():
    """The embedded runtime and the Flower apps share the federated modules and never import
    each other (the driver chooses the default)."""
    assert not any(package_of(m) == "flower" for m in reachable("sfedlora.engine.simulator"))
    # A SuperNode runs one client: neither the driver's run loop nor the embedded engine.
    node = reachable("sfedlora.flower.client_app")
    assert "sfedlora.driver.experiment" not in node and not {package_of(m) for m in node} & {"engine"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("sfedlora.data")))
def test_data_modules_import_no_model_or_evaluation_code(module):
    allowed = (
        "sfedlora.data",
        "sfedlora.config",
        "sfedlora.errors",
        "sfedlora.lora.scaling",
        "sfedlora.federated.methods",
    )
    outside = {m for m in reachable(module) if not m.startswith(allowed)}
    assert not outside, outside


def test_no_module_is_far_over_350_lines():
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 380}
    assert not long, long


def test_a_flower_node_holds_its_own_client_only(tiny_config):
    """A SuperNode's memory does not grow with the federation: at N = 1000 it holds one
    client's data and state, no more than at N = 10 (bundled SST-2, 12,000 sentences)."""
    common = ("data.max_train_examples=null", "partition.min_size=1", "federation.rounds=1")
    cfg_small = tiny_config(*common, "federation.n_clients=10")
    cfg_large = tiny_config(*common, "federation.n_clients=1000")
    data = load_task(cfg_small.data, seed=cfg_small.seed)
    small, large = build_node(cfg_small, data, 3), build_node(cfg_large, data, 3)
    assert len(small.client.data) == 1200 and len(large.client.data) == 12
    held = [len(pickle.dumps((n.client, n.fresh, n.histogram))) for n in (small, large)]
    assert held[1] < held[0]
    assert {n: t.shape for n, t in small.fresh.tensors.items()} == {
        n: t.shape for n, t in large.fresh.tensors.items()
    }
    assert not hasattr(large, "clients") and not hasattr(large.shared, "clients")
