"""The package is layered: every module imports only from its own folder or from folders below it.

Layers, bottom to top (docs/architecture.md explains each): the base modules (config, errors, fileio),
data, kernels, nn, flows, generation, models, checkpoint, train and inference, eval, and the CLI.
Imports inside functions count too: a lazy import is still a dependency.
"""

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "wavedistill"
LAYERS = {
    "version": 0, "config": 0, "errors": 0, "fileio": 0,
    "data": 1, "kernels": 2, "nn": 3, "flows": 4, "generation": 5, "models": 6, "checkpoint": 7,
    "train": 8, "inference": 8, "eval": 9, "info": 9,
    "cli": 10, "__main__": 10, "": 10,  # the CLI and the package front (wavedistill.load)
}
TOP = 10
# The subcommand registrations of synthesize/eval/bench: CLI code kept beside the inference front end.
CLI_MODULES = {"inference.cli"}


def room(module: str) -> str:
    """The layer a dotted module name (relative to the package) belongs to."""
    return module.split(".")[0] if module else ""


def level(module: str) -> int:
    if module in CLI_MODULES:
        return LAYERS["cli"]
    return LAYERS[room(module)]


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield ".".join(parts), path


def imports(module: str, path: Path):
    """Package-internal modules imported anywhere in ``path`` (relative and absolute forms)."""
    is_pkg = path.name == "__init__.py"
    here = module.split(".") if module else []
    package = here if is_pkg else here[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + (node.module.split(".") if node.module else []))
            elif node.module and (node.module == "wavedistill" or node.module.startswith("wavedistill.")):
                target = node.module[len("wavedistill."):] if node.module != "wavedistill" else ""
            else:
                continue
            if target == "" or target in LAYERS and not node.module:  # "from . import x": x is the module
                for alias in node.names:
                    yield (f"{target}.{alias.name}" if target else alias.name), node.lineno
            else:
                yield target, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("wavedistill."):
                    yield alias.name[len("wavedistill."):], node.lineno


def known(target: str) -> str:
    """Map an imported name that is not a module (``from . import kernels`` names one) to its package."""
    head = target.split(".")[0]
    return target if head in LAYERS or target in CLI_MODULES else ""


def test_every_module_has_a_layer():
    for module, _ in modules():
        assert room(module) in LAYERS or module in CLI_MODULES, f"{module} is in no layer; add it to LAYERS and docs/architecture.md"


@pytest.mark.parametrize("module,path", list(modules()), ids=lambda v: str(v))
def test_imports_only_go_down_or_sideways_within_a_folder(module, path):
    mine = level(module)
    for target, line in imports(module, path):
        target = known(target)
        if room(target) == room(module):
            continue  # inside one folder
        assert level(target) < mine or level(target) == mine in (0, TOP), (
            f"{path.relative_to(PKG.parent)}:{line} imports wavedistill.{target} (layer {level(target)}) "
            f"from layer {mine}: a folder may import only from folders below it"
        )


def test_the_checker_sees_a_violation(tmp_path):
    """The parser resolves relative imports: an upward import from nn/ is reported as models."""
    f = tmp_path / "wavenet.py"
    f.write_text("from ..models.teacher import Teacher\nfrom . import distributions\n")
    assert list(imports("nn.wavenet", f)) == [("models.teacher", 1), ("nn.distributions", 2)]
