"""cow-fork: what does forking a VM through copy-on-write EPT entries cost, eager or lazy, what
does resetting a fork to its snapshot cost, and what do 2 MiB EPT mappings change?

Three studies, one table (column ``study``); every guest is fully backed and has written every
data page once before the fork (its guest page tables have their accessed and dirty flags set):

fork
    The parent is forked eagerly (every EPT leaf write-protected in the parent and mapped
    read-only in each clone) into N clones; each clone writes a fraction of its pages (one store
    per page, seeded). Every first write to a shared page is an EPT violation that copies the
    page (or, with 2 MiB EPT pages, the whole 2 MiB, or splits the mapping and copies 4 KiB).
lazy
    Eager against lazy fork (Xen ``mem_sharing`` fork, DRAKVUF: the clone starts with an empty
    EPT, a first read shares the parent's frame read-only, a first write copies it) as the
    clone's working set grows: fork cycles, time to first instruction, exits, host memory.
reset
    The fuzzing loop of kAFL/Nyx and KF/x: a lazy clone writes ``dirty_pages`` pages, is reset
    to the snapshot by copying back only the pages it dirtied (found by PML, or by write
    protection), and runs again; against re-forking (lazy or eager) and a full copy.

In the fork and lazy studies the parent then resumes (a paused parent write-protects what its
fork left writable) and writes ``parent_fraction`` of its pages: its own faults and copies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import product
from typing import ClassVar

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..apps.cow import CopyOnWrite, copy_cycles
from ..arch.access import Access
from ..arch.bits import PAGE_SIZE, PageSize
from ..errors import ConfigError
from ..hv import VM, Hypervisor, Run
from ..hv.costs import hv_costs
from ..hv.dirty_log import PmlLog
from ..memory.layout import check_layout, in_layout
from ..mmu.config import MmuConfig
from ..tables import GuestPageTables
from ..traces.model import TraceChunk
from .base import (
    Progress,
    Row,
    check_choices,
    check_range,
    check_table_memory,
    table_bytes,
)
from .intervals import (
    bars,
    by_seed,
    column,
    lines,
    ratio,
    side,
    summarize,
    text_of,
    times,
)

HOST_MEMORY = 1 << 40
"""The model host's memory (the Hypervisor's default)."""
GVA = 0x0000_7000_0000_0000
TABLE_REGION = 8 << 20  # guest page tables live in the first 8 MiB of guest memory
MiB = 1 << 20
STUDIES = ("fork", "lazy", "reset")
TRACKINGS = ("pml", "wp")


KEYS = ("study", "guest_mib", "clones", "granularity", "fork_mode", "working_set",
        "dirty_pages", "tracking")
COLUMNS = KEYS + (
    # fork study
    "pages_written", "cow_faults", "pages_copied", "splits", "fork_cycles", "cow_cycles",
    "full_copy_cycles", "host_mib_used", "host_mib_full_copy",
    # lazy study (also pages_written, fork_cycles, pages_copied)
    "ttfi_cycles", "clone_exits", "clone_hv_cycles", "guest_cycles", "total_cycles",
    "pages_mapped", "ept_tables", "host_mib_added",
    # the parent (fork and lazy studies)
    "parent_pages_written", "parent_exits", "parent_pages_copied", "parent_cycles",
    # reset study (also guest_cycles, full_copy_cycles)
    "pages_found", "pages_restored", "run_exits", "track_cycles", "reset_cycles", "loop_cycles",
    "resets_per_s", "refork_lazy_cycles", "refork_eager_cycles", "restored_exact",
)
"""Every row has every column (None where its study does not measure it)."""


def _complete(row: Row) -> Row:
    extra = set(row) - set(COLUMNS)
    assert not extra, extra
    return {c: row.get(c) for c in COLUMNS}


def data_pages(mib: int) -> int:
    """Guest data pages (4 KiB) of a ``mib`` MiB guest."""
    return ((mib << 20) - TABLE_REGION) // PAGE_SIZE


@dataclass(frozen=True)
class CowForkParams:
    def validate(self) -> None:
        """Choices and ranges (before anything runs)."""
        check_choices("studies", self.studies, STUDIES)
        check_choices("granularities", self.granularities, ("4k", "2m-copy", "2m-split"))
        check_range("clones", self.clones, 1)
        check_range("write_fraction", self.write_fraction, 0.0, 1.0)
        check_range("parent_fraction", self.parent_fraction, 0.0, 1.0)
        check_range("write_share", self.write_share, 0.0, 1.0)
        check_range("resets", self.resets, 1, 1000)
        for name, mibs in (("guest_mibs", self.guest_mibs),
                           ("lazy_guest_mib", (self.lazy_guest_mib,)),
                           ("reset_guest_mib", (self.reset_guest_mib,))):
            for mib in mibs:
                self._check_guest(name, mib)
        check_range("working_sets", self.working_sets, 1, data_pages(self.lazy_guest_mib))
        check_range("dirty_sets", self.dirty_sets, 1, data_pages(self.reset_guest_mib))

    def _check_guest(self, name: str, mib: int) -> None:
        if mib < 16 or mib % 2:
            raise ConfigError(name, f"{mib} is not a multiple of 2 MiB >= 16 MiB")
        if mib << 20 > HOST_MEMORY // 2:  # the parent is backed in full, then copies
            raise ConfigError(
                name, f"{mib:,} MiB: at most {HOST_MEMORY >> 21:,} MiB (half the "
                f"model host's {HOST_MEMORY >> 30:,} GiB)"
            )
        small = name != "guest_mibs" or bool({"4k", "2m-split"} & set(self.granularities))
        leaf = 4096 if small else 2 << 20
        clones = max(self.clones) if name == "guest_mibs" else 2
        check_table_memory(name, table_bytes(mib << 20, leaf) * (1 + clones), f"{mib:,} MiB")

    studies: tuple[str, ...] = STUDIES
    guest_mibs: tuple[int, ...] = (64, 128)  # fork study
    clones: tuple[int, ...] = (1, 4)
    granularities: tuple[str, ...] = ("4k", "2m-copy", "2m-split")
    write_fraction: float = 0.05  # of each clone's pages, each written once (fork study)
    parent_fraction: float = 0.05  # of the parent's pages, written after it resumes
    lazy_guest_mib: int = 64  # lazy study
    working_sets: tuple[int, ...] = (16, 256, 2048, 8192)  # pages the clone touches
    write_share: float = 0.25  # of the working set, written (the rest read)
    reset_guest_mib: int = 64  # reset study
    dirty_sets: tuple[int, ...] = (1, 10, 100, 1000, 10000)  # pages written per run
    resets: int = 3  # measured run + reset iterations after the first run
    seeds: int = 5
    seed: int = 0
    layout: str = "aged"  # memory layout: aged or contiguous (docs/layouts.md)

    def __post_init__(self) -> None:
        check_layout(self.layout)


def _parent(hv: Hypervisor, mib: int, backing: PageSize) -> VM:
    """A fully backed parent whose guest maps its data region at GVA and has written every data
    page once (so its guest page tables carry accessed and dirty flags)."""
    memory = mib << 20
    parent = hv.create_vm("parent", memory, lazy=False, backing=backing)
    parent.ept.map_range(0, memory, backing)
    tables = iter(range(PAGE_SIZE, TABLE_REGION, PAGE_SIZE))
    pt = GuestPageTables(parent, lambda: next(tables))
    pt.map_range(GVA, TABLE_REGION, memory - TABLE_REGION)
    vcpu = parent.add_vcpu(cr3=pt.root)
    pages = np.arange(data_pages(mib), dtype=np.int64)
    vcpu.load([_run(pages, np.full(len(pages), Access.WRITE, np.int8))])
    hv.run([vcpu])
    return parent


def _run(pages: np.ndarray, kinds: np.ndarray, words: np.ndarray | None = None) -> Run:
    """One 8-byte access per page (at word ``words[i]``, default 0)."""
    offsets = 0 if words is None else 8 * words
    chunk = TraceChunk(GVA + pages * PAGE_SIZE + offsets, kinds,
                       np.full(len(pages), 8, np.int32))
    return Run(chunk, user=False)


def _writes(vm: VM, pages: np.ndarray, rng: np.random.Generator) -> int:
    """``vm``'s first vCPU writes one word of each page; returns the engine cycles it took."""
    vcpu = vm.vcpus[0]
    before = vcpu.stats.cycles
    vcpu.load([_run(pages, np.full(len(pages), Access.WRITE, np.int8),
                    rng.integers(0, 512, len(pages)))])
    vm.hv.run([vcpu])
    return vcpu.stats.cycles - before


def _parent_cost(cow: CopyOnWrite, parent: VM, p: CowForkParams, mib: int,
                 rng: np.random.Generator) -> Row:
    """The parent resumes and writes ``parent_fraction`` of its data pages."""
    resume = cow.resume(parent)
    pages = data_pages(mib)
    count = int(pages * p.parent_fraction)
    copied, exits, cycles = (cow.counters.per_vm["parent"], cow.counters.exits_by_vm["parent"],
                             cow.counters.cycles_by_vm["parent"])
    if count:
        _writes(parent, rng.choice(pages, count, replace=False).astype(np.int64), rng)
    return {
        "parent_pages_written": count,
        "parent_exits": cow.counters.exits_by_vm["parent"] - exits,
        "parent_pages_copied": cow.counters.per_vm["parent"] - copied,
        "parent_cycles": resume + cow.counters.cycles_by_vm["parent"] - cycles,
    }


class CowFork:
    name: ClassVar[str] = "cow-fork"
    question: ClassVar[str] = (
        "What does a copy-on-write VM fork cost against copying memory, eager or lazy, what "
        "does resetting a fork to its snapshot cost, and how do 2 MiB EPT mappings change it?"
    )
    Params: ClassVar[type] = CowForkParams
    demo: ClassVar[dict[str, str]] = {
        "guest_mibs": "16", "clones": "1,2", "seeds": "3", "lazy_guest_mib": "16",
        "working_sets": "16,256,1024", "reset_guest_mib": "16", "dirty_sets": "1,100,1000",
        "resets": "2",
    }
    keys: ClassVar[tuple[str, ...]] = KEYS

    def rows(self, params: CowForkParams, progress: Progress) -> Iterator[Row]:
        # every guest built while the rows are computed gets this layout
        yield from in_layout(params.layout, self._layout_rows(params, progress))

    def _layout_rows(self, p: CowForkParams, progress: Progress) -> Iterator[Row]:
        forks = list(product(p.guest_mibs, p.clones, p.granularities)) if "fork" in p.studies \
            else []
        lazies = list(product(p.working_sets, ("eager", "lazy"))) if "lazy" in p.studies else []
        resets = list(p.dirty_sets) if "reset" in p.studies else []
        total = len(forks) + len(lazies) + len(resets)
        done = 0
        progress(done, total)
        for mib, clones, granularity in forks:
            yield _complete(self.measure(mib, clones, granularity, p))
            done += 1
            progress(done, total)
        for working_set, mode in lazies:
            yield _complete(self.measure_lazy(working_set, mode, p))
            done += 1
            progress(done, total)
        for dirty in resets:
            yield from map(_complete, self.measure_reset(dirty, p))
            done += 1
            progress(done, total)

    # -- fork study -------------------------------------------------------------------------------

    def measure(self, mib: int, clones: int, granularity: str, p: CowForkParams) -> Row:
        """One eager fork of a ``mib`` MiB parent into ``clones`` clones that write."""
        memory = mib << 20
        backing = PageSize.SIZE_4K if granularity == "4k" else PageSize.SIZE_2M
        hv = Hypervisor(mmu=MmuConfig(), seed=p.seed)  # seed: the aged host's placement
        parent = _parent(hv, mib, backing)
        cow = CopyOnWrite(hv, granularity)
        children = cow.fork(parent, clones)
        fork_cycles = cow.counters.fork_cycles

        rng = np.random.default_rng(p.seed)
        pages = data_pages(mib)
        per_clone = max(1, int(pages * p.write_fraction))
        for child in children:
            chosen = rng.choice(pages, per_clone, replace=False).astype(np.int64)
            child.vcpus[0].load([_run(chosen, np.full(per_clone, Access.WRITE, np.int8),
                                      rng.integers(0, 512, per_clone))])
        hv.run([child.vcpus[0] for child in children])
        c = cow.counters
        clone_cycles = sum(c.cycles_by_vm[child.name] for child in children)
        row: Row = {
            **_keys("fork", mib, clones, granularity),
            "pages_written": per_clone * clones,
            "cow_faults": c.cow_faults,
            "pages_copied": c.pages_copied,
            "splits": c.splits,
            "fork_cycles": fork_cycles,
            "cow_cycles": clone_cycles,
            "full_copy_cycles": clones * copy_cycles(memory) + clones * (
                memory // backing) * hv_costs().ept_edit,
            "host_mib_used": round(hv.host.live_bytes / MiB, 2),
            "host_mib_full_copy": (clones + 1) * mib,
        }
        return row | _parent_cost(cow, parent, p, mib, rng)

    # -- lazy study -------------------------------------------------------------------------------

    def measure_lazy(self, working_set: int, mode: str, p: CowForkParams) -> Row:
        """Fork one clone (``mode`` eager or lazy) that touches ``working_set`` pages, the first
        an instruction fetch (time to first instruction), ``write_share`` of them written."""
        mib = p.lazy_guest_mib
        hv = Hypervisor(mmu=MmuConfig(), seed=p.seed)
        parent = _parent(hv, mib, PageSize.SIZE_4K)
        cow = CopyOnWrite(hv)
        live = hv.host.live_bytes
        (clone,) = cow.fork(parent, 1, lazy=mode == "lazy")
        fork_cycles = cow.counters.fork_cycles
        rng = np.random.default_rng(p.seed)
        pages = rng.choice(data_pages(mib), working_set, replace=False).astype(np.int64)
        writes = int(round(working_set * p.write_share))
        kinds = np.full(working_set, Access.READ, np.int8)
        kinds[1 + rng.choice(working_set - 1, min(writes, working_set - 1), replace=False)] = (
            Access.WRITE)
        kinds[0] = Access.FETCH  # the first instruction (a fetch: its page is only read)
        vcpu = clone.vcpus[0]
        c = cow.counters
        vcpu.access(GVA + int(pages[0]) * PAGE_SIZE, Access.FETCH)
        first = c.cycles_by_vm[clone.name] + vcpu.stats.cycles
        vcpu.load([_run(pages[1:], kinds[1:], rng.integers(0, 512, working_set - 1))])
        hv.run([vcpu])
        guest = vcpu.stats.cycles
        hv_cycles = c.cycles_by_vm[clone.name]
        row: Row = {
            **_keys("lazy", mib, 1, "4k", fork_mode=mode, working_set=working_set),
            "pages_written": int((kinds == Access.WRITE).sum()),
            "fork_cycles": fork_cycles,
            "ttfi_cycles": fork_cycles + first,
            "clone_exits": c.exits_by_vm[clone.name],
            "clone_hv_cycles": hv_cycles,
            "guest_cycles": guest,
            "total_cycles": fork_cycles + hv_cycles + guest,
            "pages_copied": c.per_vm[clone.name],
            "pages_mapped": sum(1 for _ in clone.ept.leaves(0, clone.memory)),
            "ept_tables": len(clone.ept.tables.tables),
            "host_mib_added": round((hv.host.live_bytes - live) / MiB, 3),
        }
        return row | _parent_cost(cow, parent, p, mib, rng)

    # -- reset study ------------------------------------------------------------------------------

    def measure_reset(self, dirty: int, p: CowForkParams) -> Iterator[Row]:
        """The run / reset loop of a lazy clone writing ``dirty`` pages per run, once with PML and
        once with write-protection tracking; re-forking (lazy, eager) and a full copy for
        comparison (the same rows carry them)."""
        mib = p.reset_guest_mib
        hv = Hypervisor(mmu=MmuConfig(), seed=p.seed)
        parent = _parent(hv, mib, PageSize.SIZE_4K)
        cow = CopyOnWrite(hv)
        rng = np.random.default_rng(p.seed)
        pages = rng.choice(data_pages(mib), dirty, replace=False).astype(np.int64)
        costs = hv_costs()
        rows = [self._reset_loop(hv, cow, parent, pages, tracking, p, rng)
                for tracking in TRACKINGS]
        refork = {}
        for mode in ("lazy", "eager"):
            for _ in range(2):  # the second: a loop's steady state (the parent already shared)
                c = cow.counters
                before = c.fork_cycles + c.destroy_cycles
                (clone,) = cow.fork(parent, 1, lazy=mode == "lazy")
                guest = _writes(clone, pages, rng)
                cow.destroy(clone)
                refork[mode] = (c.fork_cycles + c.destroy_cycles - before
                                + c.cycles_by_vm[clone.name] + guest + costs.vmexit)
        for row in rows:
            row["refork_lazy_cycles"] = refork["lazy"]
            row["refork_eager_cycles"] = refork["eager"]
            row["full_copy_cycles"] = (copy_cycles(mib << 20) + row["guest_cycles"]
                                       + costs.vmexit)
            yield row

    def _reset_loop(self, hv: Hypervisor, cow: CopyOnWrite, parent: VM, pages: np.ndarray,
                    tracking: str, p: CowForkParams, rng: np.random.Generator) -> Row:
        costs = hv_costs()
        profile_pml = _pml_entry_cycles()
        (clone,) = cow.fork(parent, 1, lazy=True, pml=tracking == "pml")
        log = PmlLog(clone) if tracking == "pml" else None
        if log is not None:
            log.start(0, clone.memory)
        found = restored = track = reset = guest = exits = 0
        exact = True
        for iteration in range(p.resets + 1):
            c = cow.counters
            hv_before, exits_before = c.cycles_by_vm[clone.name], c.exits_by_vm[clone.name]
            pml_before = (clone.counters["pml_full_exits"], clone.counters["pml_drained"])
            run_guest = _writes(clone, pages, rng)
            for page in pages:  # the stores' data (the engine moves no values)
                clone.write_u64(TABLE_REGION + int(page) * PAGE_SIZE + 8 * int(
                    rng.integers(0, 512)), int(rng.integers(1, 2**63)))
            if log is not None:
                edits, invepts = log.counters["ept_edits"], log.counters["invept"]
                dirty = log.collect()
                run_track = (
                    (clone.counters["pml_full_exits"] - pml_before[0]) * costs.vmexit
                    + (clone.counters["pml_drained"] - pml_before[1]) * profile_pml
                    + (log.counters["ept_edits"] - edits) * costs.ept_edit
                    + (log.counters["invept"] - invepts) * costs.invept
                )
                run_exits = clone.counters["pml_full_exits"] - pml_before[0]
                cow.written(clone)
            else:
                dirty = cow.written(clone)
                run_track = c.cycles_by_vm[clone.name] - hv_before
                run_exits = c.exits_by_vm[clone.name] - exits_before
            reset_before = c.reset_cycles
            count = cow.reset(clone, dirty, rearm=log is None)
            exact &= _matches_snapshot(cow, clone)
            if iteration:  # the first run fills the clone: the loop's steady state follows
                found += len(dirty)
                restored += count
                track += run_track
                reset += c.reset_cycles - reset_before
                guest += run_guest
                exits += run_exits
        n = p.resets
        loop = (guest + track + reset) / n + costs.vmexit  # + the exit that ends each run
        cow.destroy(clone)
        return {
            **_keys("reset", p.reset_guest_mib, 1, "4k", fork_mode="lazy",
                    dirty_pages=len(pages), tracking=tracking),
            "pages_found": found / n,
            "pages_restored": restored / n,
            "run_exits": exits / n,
            "track_cycles": track / n,
            "reset_cycles": reset / n,
            "guest_cycles": guest / n,
            "loop_cycles": loop,
            "resets_per_s": costs.cycles_per_us * 1e6 / loop,
            "restored_exact": exact,
        }

    # -- reading ----------------------------------------------------------------------------------

    def interpret(self, table: pd.DataFrame, params: CowForkParams) -> list[str]:
        out: list[str] = []
        study = table["study"] if "study" in table.columns else pd.Series("fork", table.index)
        if (study == "fork").any():
            out += _read_fork(table[study == "fork"])
        if (study == "lazy").any():
            out += _read_lazy(table[study == "lazy"])
        if (study == "reset").any():
            out += _read_reset(table[study == "reset"])
        return out

    def figures(self, table: pd.DataFrame, params: CowForkParams) -> dict[str, Figure]:
        out = {}
        if (table.study == "fork").any():
            out["cow-fork"] = _figure_fork(table[table.study == "fork"], self.keys)
        if (table.study == "lazy").any():
            out["cow-fork-lazy"] = _figure_lazy(table[table.study == "lazy"], self.keys)
        if (table.study == "reset").any():
            out["cow-fork-reset"] = _figure_reset(table[table.study == "reset"], self.keys)
        return out


def _keys(study: str, mib: int, clones: int, granularity: str, *, fork_mode: str = "eager",
          working_set: int = 0, dirty_pages: int = 0, tracking: str = "-") -> Row:
    return {"study": study, "guest_mib": mib, "clones": clones, "granularity": granularity,
            "fork_mode": fork_mode, "working_set": working_set, "dirty_pages": dirty_pages,
            "tracking": tracking}


def _pml_entry_cycles() -> int:
    from ..costs import active_profile

    return active_profile().cycles("pml_entry_cycles")


def _matches_snapshot(cow: CopyOnWrite, clone: VM) -> bool:
    """Every page ``clone`` maps holds, byte for byte, its fork-time contents."""
    memory = clone.hv.host.memory
    for gpa, leaf in clone.ept.leaves(0, clone.memory):
        source = cow.source_frame(clone, gpa)
        hpa = leaf.target
        if source is None or source == hpa:
            continue
        if not np.array_equal(memory.frame(source >> 12), memory.frame(hpa >> 12)):
            return False
    return True


# -- readings ---------------------------------------------------------------------------------


def _read_fork(t: pd.DataFrame) -> list[str]:
    big = t[t.guest_mib == t.guest_mib.max()]
    big = big[big.clones == big.clones.max()]
    mib, clones = int(big.guest_mib.iloc[0]), int(big.clones.iloc[0])
    runs = {g: by_seed(big, granularity=g) for g in dict.fromkeys(big.granularity)}
    out = []
    if "4k" in runs:
        r = runs["4k"]
        cow = r.fork_cycles + r.cow_cycles
        out.append(
            f"Forking {clones} clones of a {mib} MiB guest eagerly with 4 KiB copy-on-write "
            f"costs {text_of(cow)} cycles in all against "
            f"{text_of(r.full_copy_cycles)} for copying memory "
            f"({times(ratio(r.full_copy_cycles, cow), 'cheaper')}, a ratio of profile prices), "
            f"and the host holds {text_of(r.host_mib_used, '{:.0f}')} MiB instead of "
            f"{text_of(r.host_mib_full_copy, '{:.0f}')} MiB."
        )
        if "parent_exits" in r.columns:
            written = text_of(r.parent_pages_written)
            out.append(
                f"The parent pays too: resumed, its {written}"
                f" first writes take {text_of(r.parent_exits)} exits and copy "
                f"{text_of(r.parent_pages_copied)} pages "
                f"({text_of(r.parent_cycles)} cycles): after an eager fork every "
                "parent page is read-only, so each first write faults (by construction)."
            )
    if "2m-copy" in runs:
        r = runs["2m-copy"]
        out.append(
            f"Keeping 2 MiB EPT pages and copying them whole copies "
            f"{text_of(r.pages_copied)} pages for "
            f"{text_of(r.pages_written)} written "
            f"({ratio(r.pages_copied, r.pages_written).text('{:.0f}')} 4 KiB pages per "
            f"written page) and uses {text_of(r.host_mib_used, '{:.0f}')} MiB."
        )
    if "2m-split" in runs:
        r = runs["2m-split"]
        out.append(
            f"Splitting the 2 MiB page first ({text_of(r.splits)} splits) "
            f"brings the copies back to {text_of(r.pages_copied)} pages and "
            f"{text_of(r.host_mib_used, '{:.0f}')} MiB at a fork of "
            f"{text_of(r.fork_cycles)} cycles."
        )
    return out


def _read_lazy(t: pd.DataFrame) -> list[str]:
    sets = sorted(set(t.working_set))
    if not {"eager", "lazy"} <= set(t.fork_mode):
        return []
    mib = int(t.guest_mib.iloc[0])
    small, large = sets[0], sets[-1]
    e_small, l_small = by_seed(t, fork_mode="eager", working_set=small), by_seed(
        t, fork_mode="lazy", working_set=small)
    out = [
        f"A lazy fork of the {mib} MiB guest costs {text_of(l_small.fork_cycles)}"
        f" cycles against {text_of(e_small.fork_cycles)} eager (one clone); "
        f"its first instruction runs after {text_of(l_small.ttfi_cycles)} "
        f"cycles against {text_of(e_small.ttfi_cycles)}, the lazy clone paying "
        f"{text_of(l_small.clone_exits)} exits for its {small:,}-page working "
        f"set against {text_of(e_small.clone_exits)}."
    ]
    cheaper = []
    for ws in sets:
        e, lz = by_seed(t, fork_mode="eager", working_set=ws), by_seed(
            t, fork_mode="lazy", working_set=ws)
        r = ratio(e.total_cycles, lz.total_cycles)
        word = side(r, "lazy", "eager")
        cheaper.append(f"{ws:,} pages: {word} ({r.text('{:.2f}', 'x')} eager/lazy)")
    e_big, l_big = by_seed(t, fork_mode="eager", working_set=large), by_seed(
        t, fork_mode="lazy", working_set=large)
    out.append(
        "Fork plus the clone's exits and run, which is cheaper: " + "; ".join(cheaper)
        + f". Lazy pays an exit per page touched, eager an EPT edit per page of the guest, so "
        "the crossover follows from the prices (vmexit_cycles against ept_edit_cycles), not "
        f"from a measurement. Host memory added at {large:,} pages: lazy "
        f"{text_of(l_big.host_mib_added, '{:.1f}')} MiB, eager "
        f"{text_of(e_big.host_mib_added, '{:.1f}')} MiB (EPT tables included)."
    )
    if "parent_cycles" in t.columns:
        cost = text_of(l_small.parent_cycles)
        out.append(
            f"The resumed parent's first writes cost {cost}"
            f" cycles after a lazy fork ({text_of(l_small.parent_exits)} exits, "
            f"resume included) and {text_of(e_small.parent_cycles)} after an "
            f"eager one: a paused parent can only resume by write-protecting what the lazy fork "
            "left writable."
        )
    return out


def _read_reset(t: pd.DataFrame) -> list[str]:
    sets = sorted(set(t.dirty_pages))
    out = []
    exact = bool(t.restored_exact.all())
    parts = []
    for d in (sets[0], sets[-1]):
        for tracking in dict.fromkeys(t.tracking):
            r = by_seed(t, dirty_pages=d, tracking=tracking)
            parts.append(f"{tracking} at {d:,} dirty page{'s' if d != 1 else ''} "
                         f"{text_of(r.resets_per_s)}/s "
                         f"({text_of(r.pages_restored, '{:,.1f}')} pages restored)")
    out.append(
        "Snapshot reset runs " + "; ".join(parts) + " of modelled time (guest run included). "
        f"Every reset left the clone equal to the snapshot byte for byte: {exact}."
    )
    big = sets[-1]
    for tracking in dict.fromkeys(t.tracking):
        r = by_seed(t, dirty_pages=big, tracking=tracking)
        out.append(
            f"With {tracking} at {big:,} dirty pages a run and reset takes "
            f"{text_of(r.loop_cycles)} cycles against re-forking lazily "
            f"{times(ratio(r.refork_lazy_cycles, r.loop_cycles), 'as much')}, eagerly "
            f"{times(ratio(r.refork_eager_cycles, r.loop_cycles), 'as much')} and a full copy "
            f"{times(ratio(r.full_copy_cycles, r.loop_cycles), 'as much')}."
        )
    if set(TRACKINGS) <= set(t.tracking):
        cheaper = []
        for d in sets:
            iv = ratio(by_seed(t, dirty_pages=d, tracking="wp").loop_cycles,
                       by_seed(t, dirty_pages=d, tracking="pml").loop_cycles)
            word = side(iv, "pml", "wp")
            cheaper.append(f"{d:,}: {word} ({iv.text('{:.2f}', 'x')} wp/pml)")
        out.append("The cheaper loop by dirty pages per run: " + "; ".join(cheaper) + ".")
        p, w = by_seed(t, dirty_pages=big, tracking="pml"), by_seed(
            t, dirty_pages=big, tracking="wp")
        iv = ratio(w.loop_cycles, p.loop_cycles)
        verdict = side(iv, "write protection costs more", "PML costs more")
        out.append(
            f"PML against write protection at {big:,} pages: "
            f"{text_of(p.run_exits)} against "
            f"{text_of(w.run_exits)} exits per run, loop "
            f"{iv.text('{:.2f}', 'x')} (wp/pml): {verdict}. PML also logs the guest page-table "
            f"pages the walks touch (with EPT A/D on they count as writes, SDM Vol. 3C §29.3.5): "
            f"{text_of(p.pages_found, '{:,.1f}')} pages found against "
            f"{text_of(w.pages_found, '{:,.1f}')}."
        )
    return out


# -- figures ----------------------------------------------------------------------------------


def _figure_fork(table: pd.DataFrame, keys: tuple[str, ...]) -> Figure:
    summary = summarize(
        table.assign(total_cycles=table.fork_cycles + table.cow_cycles), keys
    )
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    labels = [f"{r.guest_mib} MiB x{r.clones} {r.granularity}" for r in summary.itertuples()]
    x = np.arange(len(summary))
    bars(left, x - 0.2, column(summary, "host_mib_used"), 0.4, label="copy-on-write")
    bars(left, x + 0.2, column(summary, "host_mib_full_copy"), 0.4, label="full copy")
    left.set_ylabel("host MiB")
    left.set_title("host memory after the clones' writes (mean, 95% interval)")
    bars(right, x - 0.2, column(summary, "total_cycles"), 0.4, label="fork + faults")
    bars(right, x + 0.2, column(summary, "full_copy_cycles"), 0.4, label="full copy")
    right.set_yscale("log")
    right.set_ylabel("cycles (cost model)")
    right.set_title("time spent")
    for ax in (left, right):
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=7, rotation=60, ha="right")
        ax.legend(fontsize=7)
    return figure


def _lines(ax: Axes, summary: pd.DataFrame, x: str, y: str, label: str) -> None:
    lines(ax, summary[x], column(summary, y), marker="o", capsize=3, label=label)


def _figure_lazy(table: pd.DataFrame, keys: tuple[str, ...]) -> Figure:
    summary = summarize(table, keys)
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    for mode in ("eager", "lazy"):
        s = summary[summary.fork_mode == mode]
        _lines(left, s, "working_set", "total_cycles", f"{mode}: fork + exits + run")
        _lines(left, s, "working_set", "ttfi_cycles", f"{mode}: first instruction")
        _lines(right, s, "working_set", "host_mib_added", mode)
    left.set_ylabel("cycles (cost model)")
    left.set_title("eager against lazy fork (mean, 95% interval)")
    right.set_ylabel("host MiB added by the fork and the clone")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("clone working set (pages)")
        ax.legend(fontsize=7)
    return figure


def _figure_reset(table: pd.DataFrame, keys: tuple[str, ...]) -> Figure:
    summary = summarize(table, keys)
    figure = Figure(figsize=(11, 4.2))
    left, right = figure.subplots(1, 2)
    for tracking in dict.fromkeys(summary.tracking):
        s = summary[summary.tracking == tracking]
        _lines(left, s, "dirty_pages", "loop_cycles", f"reset ({tracking})")
        _lines(right, s, "dirty_pages", "resets_per_s", tracking)
    s = summary[summary.tracking == summary.tracking.iloc[0]]
    _lines(left, s, "dirty_pages", "refork_lazy_cycles", "re-fork (lazy)")
    _lines(left, s, "dirty_pages", "refork_eager_cycles", "re-fork (eager)")
    _lines(left, s, "dirty_pages", "full_copy_cycles", "full copy")
    left.set_ylabel("cycles per run + reset (cost model)")
    left.set_title("snapshot reset against re-fork and full copy")
    right.set_ylabel("resets per second of modelled time")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("pages dirtied per run")
        ax.legend(fontsize=7)
    return figure
