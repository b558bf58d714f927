"""kiln's import layers (pyproject.toml, [tool.importlinter]) checked by import-linter over the
source tree, and the check shown to fail when a lower layer imports a higher one."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("trainers", "modules", "datamodules", "launch", "slurm")


def lint(tree: Path) -> subprocess.CompletedProcess:
    """lint-imports over `tree`/kiln: the folders install as `kiln.*` through an editable finder,
    which import-linter's graph builder cannot walk, so it reads them from a tree of that shape."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    linter = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(linter) if linter.exists() else "lint-imports", "--no-cache", str(ROOT / "pyproject.toml")],
                          cwd=tree, env=env, capture_output=True, text=True, timeout=300)


def test_every_layer_contract_holds(tmp_path):
    (tmp_path / "kiln").mkdir()
    for folder in FOLDERS:
        (tmp_path / "kiln" / folder).symlink_to(ROOT / folder)
    result = lint(tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_block_that_imports_a_trainer_breaks_the_layers(tmp_path):
    for folder in FOLDERS:
        shutil.copytree(ROOT / folder, tmp_path / "kiln" / folder, ignore=shutil.ignore_patterns("__pycache__"))
    fir = tmp_path / "kiln" / "modules" / "blocks" / "fir.py"
    fir.write_text(fir.read_text() + "\nfrom kiln.trainers.callbacks import ema  # noqa\n")
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "kiln.modules.blocks is not allowed to import kiln.trainers" in result.stdout, result.stdout[-3000:]


def test_trainers_know_a_family_only_through_its_contract():
    """No `hasattr`/`getattr` on a family anywhere under trainers/: what a family can do is what
    its `Spec` declares (kiln.modules.family), not what attributes it happens to have."""
    import ast

    probes = []
    for path in sorted((ROOT / "trainers").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("hasattr", "getattr")
                    and node.args and ast.unparse(node.args[0]) in ("module", "pl_module", "model", "self.model", "child",
                                                                     "self.lightning_module", "trainer.lightning_module")):
                probes.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not probes, "\n".join(probes)
