"""The method core, methods, views and local engine modules never import nvflare or fl_plugins.flare (H1), nor torch.distributed (H4)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2] / "fl_plugins"
FILES = sorted(
    [*ROOT.glob("core/*.py"), *ROOT.glob("methods/*.py"), ROOT / "data/views.py"]
    + [ROOT / f"engine/{n}.py" for n in ("ssl_train", "knn", "export")]
)


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_flare_imports(path):
    tree = ast.parse(path.read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    bad = [
        m for m in imported if m.split(".")[0] == "nvflare" or m.startswith(("fl_plugins.flare", "torch.distributed"))
    ]
    assert not bad, f"{path.name} imports {bad}"
