"""Layering: the KVM backend (``eptlab.kvm``) sits beside the hypervisor layer and imports
nothing from the layers above it (``eptlab.apps``, ``eptlab.experiments``); and its simulator
side (:mod:`eptlab.kvm.sim`) gives what the applications it stands in for give."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import eptlab
from eptlab.apps.cow import CopyOnWrite
from eptlab.costs import CostValue, Source, active_profile, use_profile
from eptlab.kvm import sim
from eptlab.kvm.backend import DATA_BASE

SRC = Path(eptlab.__file__).parent
ABOVE_KVM = ("eptlab.apps", "eptlab.experiments")


def imported_modules(source: str, module: str) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``source``, the text of ``module``
    (a plain module, not a package's ``__init__``), function-level imports included; ``from .
    import x`` counts as importing ``package.x``."""
    package = module.rsplit(".", 1)[0].split(".")
    found: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
    return found


def upward(imports: list[tuple[int, str]]) -> list[tuple[int, str]]:
    return [
        (line, name)
        for line, name in imports
        if any(name == top or name.startswith(top + ".") for top in ABOVE_KVM)
    ]


def test_kvm_imports_nothing_from_apps_or_experiments() -> None:
    found = []
    for path in sorted((SRC / "kvm").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        module = "eptlab." + ".".join(parts if path.name != "__init__.py" else parts + ("x",))
        found += [f"{path.relative_to(SRC)}:{line} imports {name}"
                  for line, name in upward(imported_modules(path.read_text(), module))]
    assert found == []


def test_the_scan_sees_relative_absolute_and_function_level_imports() -> None:
    probe = ("from ...apps.cow import CopyOnWrite\nfrom .. import sim\nfrom ..hv import x\n"
             "def f():\n    import eptlab.experiments.base\n    from ... import apps\n")
    assert upward(imported_modules(probe, "eptlab.kvm.apps.probe")) == [
        (1, "eptlab.apps.cow"),
        (1, "eptlab.apps.cow.CopyOnWrite"),
        (5, "eptlab.experiments.base"),
        (6, "eptlab.apps"),
    ]


PARENT = [DATA_BASE + i * 4096 for i in range(12)]
CLONES = [
    [DATA_BASE + 8, DATA_BASE + 4096 * 3, DATA_BASE + 4096 * 3 + 64],  # 2 pages
    [DATA_BASE + 4096 * i for i in (1, 3, 5, 7, 11)],  # 5 pages, one shared with clone 1
    [],
]


def test_the_kvm_side_fork_is_the_copy_on_write_application_on_4k_pages() -> None:
    """sim.fork re-implements the 4 KiB case of apps.cow (so that kvm/ does not import apps/):
    the same pattern through CopyOnWrite gives the same pages copied and the same cycles."""
    memory = 8 << 20
    hv, parent, vcpu = sim._machine(memory)
    vcpu.load([sim._writes(PARENT)])
    hv.run([vcpu])
    cow = CopyOnWrite(hv)
    clones = cow.fork(parent, len(CLONES))
    for clone, writes in zip(clones, CLONES, strict=True):
        clone.vcpus[0].load([sim._writes(writes)])
        hv.run([clone.vcpus[0]])
    ours = sim.fork(memory, PARENT, CLONES)
    assert ours.pages_copied == [cow.counters.per_vm[c.name] for c in clones] == [2, 5, 0]
    assert (ours.fork_cycles, ours.fault_cycles) == (
        cow.counters.fork_cycles, cow.counters.fault_cycles)


@pytest.mark.parametrize("which", ["fork", "pml", "trap"])
def test_the_kvm_side_prices_with_the_active_cost_profile(which: str) -> None:
    """Not a module constant read at import: under another profile (``--profile``) the
    modelled cycles change by what the profile changed."""

    def cycles() -> int:
        memory = 8 << 20
        if which == "fork":
            out = sim.fork(memory, PARENT, CLONES)
            return out.fork_cycles + out.fault_cycles
        rounds = [PARENT[:5], PARENT[3:9]]
        run = sim.dirty_log_pml if which == "pml" else sim.dirty_log_trap
        return run(memory, rounds).modelled_cycles

    base = active_profile()
    before = cycles()
    dearer = base.with_values({
        key: CostValue(base[key] + 1000, "cycles", Source("assumed", "a test"))
        for key in ("vmexit_cycles", "invept_cycles", "ept_edit_cycles")
    })
    with use_profile(dearer):
        after = cycles()
    assert after > before


TESTS = Path(__file__).parent
TOP_LEVEL_TESTS = {  # tests of a top-level module, or across every package
    "test_bench_limit.py",  # eptlab.bench_limit
    "test_workloads.py",  # eptlab.workloads
    "test_errors.py",  # eptlab.errors
    "test_fuzz_inputs.py",  # every trace reader and the sweep spec loader
    "test_docs.py",  # the documentation of every package
    "test_layering.py",  # the imports between packages
}


def test_tests_mirror_the_package() -> None:
    """The tests of ``eptlab.X`` live in ``tests/X/``: every folder under tests/ (but the data
    folders) names a package of eptlab, and only the cross-cutting tests stay at the top."""
    packages = {p.name for p in SRC.iterdir() if (p / "__init__.py").is_file()}
    folders = {p for p in TESTS.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {p.name for p in folders} <= packages
    for folder in folders:
        assert list(folder.glob("test_*.py")), f"{folder} holds no tests"
    assert {p.name for p in TESTS.glob("test_*.py")} == TOP_LEVEL_TESTS
