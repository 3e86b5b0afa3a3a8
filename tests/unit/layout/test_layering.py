"""The house's layers point one way: each module imports only what sits below it (docs/architecture.md).

Every ``import`` of every module counts, including imports inside functions and ``TYPE_CHECKING`` blocks.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[3] / "invert_ad"

LAYERS: list[set[str]] = [
    {"_version", "io", "defaults", "acceleration", "registry"},  # plumbing: versions, files, settings, registries
    {"schedule"},  # alpha-bars and inversion grids
    {"inversion"},  # the Euler DDIM loop and the one-step IRF
    {"denoiser"},  # any model or callable as eps(x_t, t)
    {"models"},  # the library's own denoisers
    {"scoring"},  # latent statistics: NLL, max-min, hybrid, maps
    {"hub"},  # model folders and the Hub
    {"scorer"},  # InversionScorer: features -> raw scores
    {"features"},  # images -> features (backbones)
    {"data"},  # datasets, image reading, the feature cache
    {"calibration"},  # thresholds, normalisation, domain check
    {"detector"},  # AnomalyDetector: images -> decisions
    {"routing"},  # RoutedDetector: one expert detector per product behind a router
    {"metrics"},  # the field's metrics
    {"adapters", "training", "evaluation", "predict_files", "export", "engines", "viz"},  # the edge
    {"cli", "__init__"},  # entry points
]
LAYER_OF = {name: i for i, names in enumerate(LAYERS) for name in names}
EDGE = LAYER_OF["adapters"]
EDGE_MAY_USE = {
    "evaluation": {"viz"},
    "training": set(),
    "adapters": set(),
    "predict_files": set(),
    "export": set(),
    "viz": set(),
    "engines": {"export"},
}
"""Which edge modules an edge module may import (the rest of the edge is off limits: e.g. no evaluation ->
training)."""


def group_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> set[str]:
    """The ``invert_ad`` groups a source file imports."""
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    module = ".".join(relative.parts).removesuffix(".__init__")
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] if node.module else [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        found |= {group_of(t) for t in targets if t == "invert_ad" or t.startswith("invert_ad.")}
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    groups = {group_of(".".join(p.relative_to(PACKAGE.parent).with_suffix("").parts)) for p in SOURCES}
    groups.discard("invert_ad")
    assert groups - set(LAYER_OF) == set(), "add new modules to LAYERS here and in docs/architecture.md"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path: Path):
    own = group_of(".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__"))
    own = "__init__" if own == "invert_ad" else own
    for target in imports(path) - {own}:
        if LAYER_OF[own] == EDGE and LAYER_OF[target] == EDGE:
            assert target in EDGE_MAY_USE[own], f"{path.name}: edge module {own} imports edge module {target}"
            continue
        assert LAYER_OF[target] < LAYER_OF[own], f"{path.relative_to(PACKAGE)} ({own}) imports {target}, above it"


def test_the_checker_sees_function_level_imports(tmp_path):
    source = tmp_path / "invert_ad" / "scoring" / "bad.py"
    source.parent.mkdir(parents=True)
    source.write_text("def f():\n    from ..detector import AnomalyDetector\n    import invert_ad.cli\n")
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path / "invert_ad"
    try:
        assert imports(source) == {"detector", "cli"}
    finally:
        PACKAGE = saved
