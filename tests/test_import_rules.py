"""DESIGN.md's import rules, checked on the source: `kernels` imports nothing of ours, `serving`
imports only `kernels`, `sampling` imports nothing of ours, and nothing imports `rollout`."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALLOWED = {
    "kernels": {"kernels"},
    "serving": {"serving", "kernels"},
    "sampling": {"sampling"},
    "rollout": {"rollout", "serving", "sampling", "kernels"},
}


def _our_imports(path: Path, folder: str) -> set[str]:
    """Top folders of `rollout_accel` this module imports (relative imports stay in `folder`)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                found.add(folder)
                continue
            names = [node.module or ""]
        for name in names:
            parts = name.split(".")
            if parts[0] == "rollout_accel" and len(parts) > 1:
                found.add(parts[1])
    return found


@pytest.mark.parametrize("folder", sorted(ALLOWED))
def test_folder_imports_only_what_design_allows(folder: str) -> None:
    bad = []
    for path in sorted((ROOT / folder).rglob("*.py")):
        extra = _our_imports(path, folder) - ALLOWED[folder]
        if extra:
            bad.append(f"{path.relative_to(ROOT)} imports {sorted(extra)}")
    assert not bad, "\n".join(bad)
