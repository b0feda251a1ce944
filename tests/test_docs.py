"""The documentation site: it builds with --strict (the tutorials execute in the build), every
experiment has a page in the navigation, every module has an API page, and every public class
and function of the documented packages has a docstring."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from eptlab.experiments.registry import kvm_names, names

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
DOCSTRING_PACKAGES = ("arch", "mmu", "hv", "guest", "traces", "kvm")


def _nav_text() -> str:
    return (ROOT / "mkdocs.yml").read_text()


@pytest.mark.parametrize("name", names() + kvm_names())
def test_every_experiment_has_a_page_in_the_navigation(name: str) -> None:
    page = DOCS / "experiments" / f"{name}.md"
    assert page.is_file(), f"docs/experiments/{name}.md is missing"
    assert f"experiments/{name}.md" in _nav_text(), f"{name} is not in mkdocs.yml's nav"
    assert f"({name}.md)" in (DOCS / "experiments" / "index.md").read_text()


def test_every_module_of_the_package_has_an_api_entry() -> None:
    api = "\n".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    missing = []
    for path in sorted((ROOT / "src" / "eptlab").rglob("*.py")):
        rel = path.relative_to(ROOT / "src").with_suffix("")
        parts = rel.parts
        if parts[-1] in ("__init__", "__main__") or len(parts) < 3:
            continue
        if parts[1] not in {p.stem for p in (DOCS / "api").glob("*.md")}:
            continue
        if "kernels" in parts:  # numba kernels: documented by mmu.engine, not rendered
            continue
        if f"::: {'.'.join(parts)}" not in api:
            missing.append(".".join(parts))
    assert not missing, f"modules without an API entry in docs/api: {missing}"


def public_names_without_docstring() -> list[str]:
    """``file:line name`` of each public class, function and method without a docstring."""
    gaps = []
    for package in DOCSTRING_PACKAGES:
        for path in sorted((ROOT / "src" / "eptlab" / package).rglob("*.py")):
            if "kernels" in path.parts:
                continue
            tree = ast.parse(path.read_text())
            for node in tree.body:
                if not isinstance(node, ast.FunctionDef | ast.ClassDef) or node.name[0] == "_":
                    continue
                where = f"{path.relative_to(ROOT)}:{node.lineno}"
                if ast.get_docstring(node) is None:
                    gaps.append(f"{where} {node.name}")
                if isinstance(node, ast.ClassDef):
                    for sub in node.body:
                        if (
                            isinstance(sub, ast.FunctionDef)
                            and sub.name[0] != "_"
                            and ast.get_docstring(sub) is None
                        ):
                            gaps.append(f"{path.relative_to(ROOT)}:{sub.lineno} "
                                        f"{node.name}.{sub.name}")
    return gaps


def test_public_names_have_docstrings() -> None:
    gaps = public_names_without_docstring()
    assert not gaps, f"{len(gaps)} public names without a docstring:\n" + "\n".join(gaps)


@pytest.mark.slow
def test_the_site_builds_strict_with_the_tutorials_executed(tmp_path: Path) -> None:
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))
    if mkdocs is None:
        pytest.fail("mkdocs is not installed: it is a dev dependency (pip install -e '.[dev]')")
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1", PYTHONPATH=str(ROOT / "src"))
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    for name in names() + kvm_names():
        assert (tmp_path / "site" / "experiments" / name / "index.html").is_file()
    for notebook in sorted((DOCS / "tutorials").glob("*.ipynb")):
        page = (tmp_path / "site" / "tutorials" / notebook.stem / "index.html").read_text()
        assert "Traceback" not in page and "jp-OutputArea-output" in page, notebook.name


def test_the_readme_is_a_short_front_door_whose_links_resolve() -> None:
    import re

    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) < 250
    first_block = text.split("```")[1]
    assert "make demo" in first_block and "make test" in first_block
    broken = [
        target
        for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
        if not target.startswith(("http://", "https://")) and not (ROOT / target).exists()
    ]
    assert not broken, f"README links to missing files: {broken}"
