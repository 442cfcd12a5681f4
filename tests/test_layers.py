"""The layer contract (``tests/layer_contract.py``): the package keeps it, and the checker catches each kind of
breach in a small fake package (upward imports, also inside functions, relative or via ``importlib``; nvflare or
torch.distributed below flare; a base module importing the package; a sub-package outside the order)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from layer_contract import import_cycles, violations

import fl_plugins

PACKAGE_ROOT = Path(fl_plugins.__file__).resolve().parent

#: Known breaches, to be removed (each is ``(file, imported-name prefix)``; line numbers are not matched).
#: Keep this list empty: a breach listed here that no longer occurs fails the test, so the list cannot go stale.
KNOWN: list[tuple[str, str]] = [
    # e.g. ("fl_plugins/models/factory.py", "fl_plugins.methods"),  (models.factory built the "dino" arch; removed)
]


def _is_known(v: str) -> bool:
    return any(v.startswith(f"{f}:") and f" imports {name}" in v for f, name in KNOWN)


def test_package_keeps_the_layer_contract():
    found = violations(PACKAGE_ROOT)
    broken = [v for v in found if not _is_known(v)]
    assert not broken, "layer contract broken (see tests/layer_contract.py):\n" + "\n".join(broken)
    stale = [k for k in KNOWN if not any(v.startswith(f"{k[0]}:") and f" imports {k[1]}" in v for v in found)]
    assert stale == [], f"KNOWN lists breaches that are gone; remove them: {stale}"


def _fake_package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "fl_plugins"
    for rel in ["__init__.py", "core/__init__.py", "data/__init__.py", "flare/__init__.py", "methods/__init__.py",
                *files]:
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_text(textwrap.dedent(files.get(rel, "")))
    return pkg


BREACHES = {
    "core imports flare": ("core/x.py", "from fl_plugins.flare.y import Y\n", 1,
                           "fl_plugins.core.x imports fl_plugins.flare.y: upward import, layer core (rank 1) must "
                           "not import layer flare (rank 6)"),
    "data imports methods": ("data/z.py", "import os\nimport fl_plugins.methods\n", 2,
                             "upward import, layer data (rank 2) must not import layer methods (rank 5)"),
    "inside a function": ("engine/a.py", "def f():\n    from fl_plugins.methods.dino import DINOMethod\n", 2,
                          "layer engine (rank 4) must not import layer methods (rank 5)"),
    "relative import": ("models/b.py", "from ..methods import dino\n", 1,
                        "fl_plugins.models.b imports fl_plugins.methods: upward import"),
    "from package import layer": ("data/c.py", "from fl_plugins import flare\n", 1,
                                  "imports fl_plugins.flare: upward import, layer data"),
    "importlib literal": ("methods/d.py", "import importlib\nimportlib.import_module('fl_plugins.flare.jobs')\n", 2,
                          "layer methods (rank 5) must not import layer flare (rank 6)"),
    "nvflare in engine": ("engine/e.py", "from nvflare.app_common.abstract.fl_model import FLModel\n", 1,
                          "only fl_plugins.flare and fl_plugins.cli may import nvflare (engine is below flare)"),
    "nvflare in core": ("core/n.py", "import nvflare\n", 1, "may import nvflare (core is below flare)"),
    "torch.distributed in methods": ("methods/t.py", "import torch.distributed as dist\n", 1,
                                     "no module below fl_plugins.flare may import torch.distributed"),
    "from torch import distributed": ("core/u.py", "from torch import distributed\n", 1,
                                      "imports torch.distributed: no module below fl_plugins.flare"),
    "base module imports the package": ("wire.py", "from fl_plugins.core import x\n", 1,
                                        "a base module (wire) imports nothing from fl_plugins"),
    "base module imports a third party": ("settings.py", "import numpy\n", 1,
                                          "a base module (settings) imports the standard library only"),
    "sub-package outside the order": ("extras/w.py", "", 1, "sub-package fl_plugins.extras is not in the layer order"),
}


@pytest.mark.parametrize("case", sorted(BREACHES))
def test_each_kind_of_breach_is_reported(tmp_path, case):
    rel, source, line, message = BREACHES[case]
    found = violations(_fake_package(tmp_path, {rel: source}))
    assert len(found) == 1, found
    assert found[0].startswith(f"fl_plugins/{rel}:{line}: ") and message in found[0], found


def test_allowed_imports_are_not_reported(tmp_path):
    pkg = _fake_package(tmp_path, {
        "wire.py": "import os\nfrom collections.abc import Mapping\n",
        "core/k.py": "import torch\nfrom fl_plugins.wire import TASK_TRAIN\nfrom fl_plugins.core import ema\n",
        "engine/k.py": "from fl_plugins.data.partition import position_partition\nfrom fl_plugins.models import x\n",
        "methods/m.py": "from fl_plugins.engine.knn import knn_items\nfrom . import dino\n",
        "flare/f.py": "import nvflare\nimport torch.distributed\nfrom fl_plugins.methods import DINOMethod\n",
        "cli.py": "def main():\n    from fl_plugins.flare.job_builder import build_job\n",
    })
    assert violations(pkg) == []


def test_package_has_no_import_circle():
    """No two modules import each other, directly or through others, also not through imports inside functions
    (a circle hidden in a function still couples the two modules both ways)."""
    assert import_cycles(PACKAGE_ROOT) == []


CIRCLES = {
    "at module level": ({"flare/a.py": "from fl_plugins.flare.b import B\n",
                         "flare/b.py": "import fl_plugins.flare.a\n"}, [["fl_plugins.flare.a", "fl_plugins.flare.b"]]),
    "inside a function": ({"methods/reg.py": "def f():\n    import fl_plugins.methods.builtin\n",
                           "methods/builtin.py": "from fl_plugins.methods.reg import register\n"},
                          [["fl_plugins.methods.builtin", "fl_plugins.methods.reg"]]),
    "through a third module, relative": ({"core/x.py": "from .y import Y\n", "core/y.py": "from . import z\n",
                                          "core/z.py": "def g():\n    from fl_plugins.core.x import X\n"},
                                         [["fl_plugins.core.x", "fl_plugins.core.y", "fl_plugins.core.z"]]),
    "via a package __init__": ({"data/__init__.py": "from fl_plugins.data.q import Q\n",
                                "data/q.py": "from fl_plugins.data import helper\n"},
                               [["fl_plugins.data", "fl_plugins.data.q"]]),
    "one direction only is fine": ({"flare/a.py": "from fl_plugins.flare.b import B\n", "flare/b.py": "X = 1\n"},
                                   []),
}


@pytest.mark.parametrize("case", sorted(CIRCLES))
def test_import_circles_are_found(tmp_path, case):
    files, expected = CIRCLES[case]
    assert import_cycles(_fake_package(tmp_path, files)) == expected


def test_job_modules_stay_small():
    """One module per job family, none over about 300 lines (the job layer was one 886-line file)."""
    big = {p.name: n for p in (PACKAGE_ROOT / "flare" / "jobs").glob("*.py")
           if (n := len(p.read_text().splitlines())) > 300}
    assert big == {}
