"""Dirty-page logging, the way a hypervisor tracks what a guest writes (live migration, snapshots,
incremental checkpoints), in rounds: ``start`` arms a range, the guest runs, ``collect`` returns
the pages written since the last round and re-arms them.

:class:`WriteProtectLog`
    Without PML: every page of the range loses EPT write permission; the first write to each
    page in a round is an EPT violation (exit reason 48), the handler records the page and
    gives the permission back (no INVEPT: permissions only grew, and the processor re-walks an
    access its cached translation does not permit). ``collect`` write-protects the pages
    written in the round again and runs INVEPT (permissions shrank: cached translations must go).
:class:`PmlLog`
    With page-modification logging (SDM Vol. 3C §29.3.6): writes run free; the processor logs
    the GPA of each page whose EPT dirty flag goes 0 -> 1 into the vCPU's 512-entry log, and a
    full log exits (reason 62; :meth:`VM.handle_pml_full` drains it into :attr:`VM.dirty_log`).
    ``collect`` drains every vCPU's log, clears the dirty flags of the logged pages and runs
    INVEPT so that their next write sets the flag, and logs, again.
"""

from __future__ import annotations

from collections import Counter

from ..arch.bits import PAGE_SIZE
from ..arch.ept import Ept
from ..arch.exits import EptQual, EptViolation, ExitReason
from ..errors import ConfigError
from .exits import Exit, ExitAction
from .vm import VM

_PAGE_MASK = ~(PAGE_SIZE - 1)


class WriteProtectLog:
    """Dirty logging by write protection of one VM's 4 KiB EPT pages."""

    def __init__(self, vm: VM) -> None:
        self.vm = vm
        self.armed: set[int] = set()  # write-protected pages, waiting for their first write
        self.dirty: set[int] = set()  # pages written in this round
        self.counters: Counter[str] = Counter()
        vm.hv.on(ExitReason.EPT_VIOLATION, self.handle)

    def _protect(self, pages: list[int]) -> None:
        memory = self.vm.hv.host.memory
        for page in pages:
            leaf = self.vm.ept.lookup(page)
            if leaf is None or leaf.level != 1:
                raise ConfigError("dirty log", f"GPA {page:#x} is not mapped by a 4 KiB EPT page")
            if leaf.value & Ept.W:
                memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.W))
                self.counters["ept_edits"] += 1
            self.armed.add(page)
        if pages:
            self.vm.invept()
            self.counters["invept"] += 1

    def start(self, gpa: int, length: int) -> None:
        """Track ``[gpa, gpa + length)`` (mapped with 4 KiB pages) from now on."""
        self._protect(list(range(gpa & _PAGE_MASK, gpa + length, PAGE_SIZE)))

    def handle(self, exit_: Exit) -> ExitAction | None:
        """EPT-violation handler: a write to a write-protected page of this VM is logged, the page
        made writable again and the guest resumed."""
        record = exit_.record
        if exit_.vcpu.vm is not self.vm or not isinstance(record, EptViolation):
            return None
        page = record.gpa & _PAGE_MASK
        if not record.qualification & EptQual.WRITE or page not in self.armed:
            return None
        leaf = self.vm.ept.lookup(page)
        assert leaf is not None
        self.vm.hv.host.memory.write_u64(leaf.entry_address, leaf.value | Ept.W)
        self.armed.discard(page)
        self.dirty.add(page)
        self.counters["write_faults"] += 1
        self.counters["ept_edits"] += 1
        return ExitAction.RETRY

    def collect(self) -> set[int]:
        """The pages written since the last round; they are write-protected again."""
        dirty, self.dirty = self.dirty, set()
        self._protect(sorted(dirty))
        self.counters["rounds"] += 1
        return dirty


class PmlLog:
    """Dirty logging with PML for one VM (created with ``pml=True``)."""

    def __init__(self, vm: VM) -> None:
        if not vm.pml_enabled:
            raise ConfigError("pml", f"VM {vm.name} does not have PML enabled")
        self.vm = vm
        self.counters: Counter[str] = Counter()

    def _clear_dirty(self, pages: list[int]) -> None:
        memory = self.vm.hv.host.memory
        for page in pages:
            leaf = self.vm.ept.lookup(page)
            if leaf is not None and leaf.value & Ept.D:
                memory.write_u64(leaf.entry_address, leaf.value & ~int(Ept.D))
                self.counters["ept_edits"] += 1
        if pages:
            self.vm.invept()
            self.counters["invept"] += 1

    def start(self, gpa: int, length: int) -> None:
        """Clear the dirty flags of ``[gpa, gpa + length)`` so its next writes are logged."""
        for vcpu in self.vm.vcpus:
            self.vm.drain_pml(vcpu)
        self.vm.dirty_log.clear()
        self._clear_dirty(list(range(gpa & _PAGE_MASK, gpa + length, PAGE_SIZE)))

    def collect(self) -> set[int]:
        """The pages logged since the last round (log-full drains included); their dirty flags
        are cleared again."""
        for vcpu in self.vm.vcpus:
            self.vm.drain_pml(vcpu)
        dirty = {gpa & _PAGE_MASK for gpa in self.vm.dirty_log}
        self.vm.dirty_log.clear()
        self._clear_dirty(sorted(dirty))
        self.counters["rounds"] += 1
        return dirty
