"""The KVM layer: ABI numbers, exit decoding (synthetic exits, no VM), and real guests on
/dev/kvm (marked ``kvm``): exit records, errors that clean up, no leaked fds or mappings."""

from __future__ import annotations

import os

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab.arch.exits import EptQual, EptViolation, ExitReason, PmlFull
from eptlab.errors import ConfigError, GuestError, KvmError
from eptlab.hv.exits import ExitAction, Hlt, TripleFault, Vmcall
from eptlab.kvm import abi, build
from eptlab.kvm.backend import (
    DATA_BASE,
    HC_PORT,
    KvmExit,
    KvmFailure,
    KvmGuest,
    PortIo,
    SlotSpec,
    default_slots,
    exit_record,
    flavour,
    run_guest,
)
from eptlab.kvm.fds import Kvm, dirty_pages
from eptlab.kvm.memory import GuestMemory
from eptlab.kvm.vcpu_exit import (
    DirtyRingFull,
    HltExit,
    InternalError,
    IoOut,
    MmioRead,
    MmioWrite,
    ShutdownExit,
)

# -- no VM needed ----------------------------------------------------------------------------------


def test_ioctl_numbers_are_the_kernels() -> None:
    # values of the macros in linux/kvm.h on x86-64
    assert abi.IOCTLS["KVM_CREATE_VM"] == 0xAE01
    assert abi.IOCTLS["KVM_RUN"] == 0xAE80
    assert abi.IOCTLS["KVM_GET_REGS"] == 0x8090AE81
    assert abi.IOCTLS["KVM_SET_SREGS"] == 0x4138AE84
    assert abi.IOCTLS["KVM_SET_USER_MEMORY_REGION"] == 0x4020AE46
    assert abi.IOCTLS["KVM_GET_DIRTY_LOG"] == 0x4010AE42
    assert abi.IOCTLS["KVM_ENABLE_CAP"] == 0x4068AEA3


def regs(**values: int) -> abi.Regs:
    r = abi.Regs()
    for k, v in values.items():
        setattr(r, k, v)
    return r


SLOTS = [SlotSpec(0, 2 << 20), SlotSpec(2 << 20, 2 << 20, abi.MemFlag.READONLY)]


def test_hypercall_port_io_is_a_vmcall_with_registers() -> None:
    record, _ = exit_record(IoOut(HC_PORT, b"\x05\0\0\0"), SLOTS,
                            lambda: regs(rax=5, rbx=1, rcx=2, rdx=3, rsi=4))
    assert record == Vmcall(5, (1, 2, 3, 4))


def test_other_ports_do_not_read_registers() -> None:
    def no_regs() -> abi.Regs:
        raise AssertionError("registers read for a non-hypercall port")

    record, _ = exit_record(IoOut(0x3F8, b"A"), SLOTS, no_regs)
    assert record == PortIo(0x3F8, True, b"A")


def test_write_to_read_only_slot_is_a_write_protection_violation() -> None:
    record, data = exit_record(MmioWrite(0x201008, b"\x01" * 8), SLOTS, regs)
    assert isinstance(record, EptViolation) and record.gpa == 0x201008 and data == b"\x01" * 8
    q = EptQual(record.qualification)
    assert q & EptQual.WRITE and q & EptQual.READABLE and not q & EptQual.WRITABLE


@given(
    flags=st.lists(st.sampled_from([0, abi.MemFlag.READONLY, abi.MemFlag.LOG_DIRTY_PAGES]),
                   min_size=1, max_size=4),
    gpa=st.integers(0, 10 << 20),
    write=st.booleans(),
)
def test_mmio_record_follows_the_slot_flags(flags: list[int], gpa: int, write: bool) -> None:
    slots = [SlotSpec(i * (2 << 20), 2 << 20, f) for i, f in enumerate(flags)]
    # the expectation, from the slot flags alone (SDM Vol. 3C Table 28-7, bits 0-5)
    index = gpa // (2 << 20)
    slot_flags = flags[index] if index < len(flags) else None
    vexit = MmioWrite(gpa, b"\0" * 8) if write else MmioRead(gpa, 8)
    record, data = exit_record(vexit, slots, regs)
    if slot_flags is None:  # no slot: not present, no permission bits
        assert record == EptViolation(gpa, None, EptQual.WRITE if write else EptQual.READ)
    elif write and slot_flags & abi.MemFlag.READONLY:  # write-protected: readable, executable
        assert record == EptViolation(
            gpa, None, EptQual.WRITE | EptQual.READABLE | EptQual.EXECUTABLE)
        assert data == b"\0" * 8
    else:  # a readable page read, or a writable one written: no EPT violation is possible
        assert isinstance(record, KvmFailure) and hex(gpa) in record.what


def test_access_outside_every_slot_is_a_not_present_violation() -> None:
    record, _ = exit_record(MmioRead(0x10_0000_0000, 8), SLOTS, regs)
    assert isinstance(record, EptViolation)
    assert record.qualification == EptQual.READ  # no permission bits: nothing mapped


@pytest.mark.parametrize(
    ("vexit", "expected"),
    [(HltExit(), Hlt), (ShutdownExit(), TripleFault), (DirtyRingFull(), PmlFull),
     (InternalError(1, (2,)), KvmFailure)],
)
def test_other_exits(vexit: object, expected: type) -> None:
    record, _ = exit_record(vexit, SLOTS, regs)  # type: ignore[arg-type]
    assert isinstance(record, expected)


def test_dirty_bitmap_bits_are_little_endian_page_numbers() -> None:
    import numpy as np

    bitmap = np.zeros(16, np.uint8)
    bitmap[0], bitmap[9] = 0b1000_0001, 0b10
    assert dirty_pages(bitmap).tolist() == [0, 7, 73]


def test_slot_layout_checks_sizes() -> None:
    assert [s.gpa for s in default_slots(8 << 20, chunk=2 << 20)] == [0, 2 << 20, 4 << 20, 6 << 20]
    with pytest.raises(ConfigError):
        default_slots(3 << 20)
    with pytest.raises(ConfigError):
        default_slots(8 << 20, chunk=5000)


def test_unknown_guest_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="guest"):
        build.build("no-such-guest")


def test_missing_tool_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: object) -> None:
    monkeypatch.setenv("EPTLAB_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", "/nonexistent")
    from eptlab.errors import ToolchainError

    with pytest.raises(ToolchainError, match="as"):
        build.build("halt")


# -- on /dev/kvm -----------------------------------------------------------------------------------


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum(1 for _ in f)


@pytest.mark.kvm
def test_flavour_is_reported() -> None:
    f = flavour()
    assert f.module.startswith("kvm")
    assert set(f.as_dict()) == {"kvm_module", "tdp"}


@pytest.mark.kvm
def test_halt_is_an_hlt_record() -> None:
    result = run_guest("halt", user=False)
    assert result.halted and result.exits[ExitReason.HLT] == 1


@pytest.mark.kvm
def test_hlt_in_user_mode_faults_and_without_an_idt_shuts_down() -> None:
    with pytest.raises(GuestError, match="triple fault"):
        run_guest("halt", user=True)


@pytest.mark.kvm
@pytest.mark.parametrize("user", [False, True])
def test_both_privilege_levels_run_the_same_program(user: bool) -> None:
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "touch", user=user) as g:
        g.start(r8=DATA_BASE, r9=16, r10=4096, r11=5, r12=1)
        assert g.run().status == 0
        assert [g.memory.read_u64(DATA_BASE + i * 4096) for i in range(16)] == [5] * 16


@pytest.mark.kvm
def test_touch_writes_the_pattern_with_stride() -> None:
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "touch") as g:
        g.start(r8=DATA_BASE, r9=10, r10=3 * 4096, r11=0x1122334455667788, r12=1)
        result = g.run()
        assert result.status == 0 and result.reports[1] > 0  # guest TSC cycles
        written = [g.memory.read_u64(DATA_BASE + i * 3 * 4096) for i in range(10)]
        assert written == [0x1122334455667788] * 10
        assert g.memory.read_u64(DATA_BASE + 4096) == 0  # between the strides: untouched


@pytest.mark.kvm
def test_read_only_slot_traps_every_write_and_emulation_completes_it() -> None:
    with Kvm.open() as kvm:
        slots = default_slots(8 << 20, data_flags=abi.MemFlag.READONLY)
        with KvmGuest(kvm, GuestMemory(8 << 20), "touch", slots=slots) as g:
            seen: list[EptViolation] = []

            def trap(e: KvmExit) -> ExitAction | None:
                if isinstance(e.record, EptViolation):
                    seen.append(e.record)
                    g.emulate_write(e)
                    return ExitAction.SKIP
                return None

            g.start(r8=DATA_BASE, r9=5, r10=4096, r11=7, r12=1)
            g.run(trap)
            assert [r.gpa for r in seen] == [DATA_BASE + i * 4096 for i in range(5)]
            assert all(r.qualification & EptQual.WRITE for r in seen)
            assert [g.memory.read_u64(DATA_BASE + i * 4096) for i in range(5)] == [7] * 5


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("guest", "match", "record"),
    [
        ("triple_fault", "triple fault", TripleFault),
        ("bad_hypercall", "unknown hypercall 0x7777", Vmcall),
        ("spin", "watchdog", type(None)),
    ],
)
def test_misbehaving_guests_are_reported_and_cleaned_up(
    guest: str, match: str, record: type
) -> None:
    with pytest.raises(GuestError):  # warm-up: image built, CPUID cached, timer thread's arena
        run_guest(guest, timeout=0.3)
    fds, maps = open_fds(), mappings()
    with pytest.raises(GuestError, match=match) as info:
        run_guest(guest, timeout=0.3)
    assert isinstance(info.value.record, record)
    assert (open_fds(), mappings()) == (fds, maps)


@pytest.mark.kvm
def test_a_write_outside_memory_is_reported() -> None:
    # 8 MiB of memory, the guest writes at 16 MiB: no slot there
    with pytest.raises(GuestError, match="no writable memslot"):
        run_guest("touch", registers=dict(r8=16 << 20, r9=1, r10=4096, r11=1, r12=1))


@pytest.mark.kvm
def test_no_descriptor_or_mapping_leaks_over_many_vms() -> None:
    with Kvm.open() as kvm:
        run_guest("halt", kvm=kvm, user=False)  # warm-up: images built, CPUID cached
        fds, maps = open_fds(), mappings()
        for i in range(40):
            if i % 4 == 3:
                with pytest.raises(GuestError):
                    run_guest("triple_fault", kvm=kvm)
            else:
                run_guest("halt", kvm=kvm, user=False)
        # a failure half-way through construction releases what was made
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION"):
            KvmGuest(kvm, GuestMemory(8 << 20), "halt",
                     slots=[SlotSpec(0, 4 << 20), SlotSpec(2 << 20, 4 << 20)])  # overlap
        assert (open_fds(), mappings()) == (fds, maps)


@pytest.mark.kvm
def test_closed_descriptor_errors_name_the_ioctl() -> None:
    kvm = Kvm.open()
    vm = kvm.create_vm()
    vm.close()
    with pytest.raises(KvmError, match="KVM_CREATE_VCPU"):
        vm.create_vcpu(0)
    kvm.close()
    assert vm.closed and kvm.closed


@pytest.mark.kvm
def test_kernel_patches_trap_on_a_read_only_code_page_and_run_once_emulated() -> None:
    from eptlab.kvm.backend import BOOT_SIZE, LOG_AREA, image

    nop5_nop3 = bytes([0x0F, 0x1F, 0x44, 0x00, 0x00, 0x0F, 0x1F, 0x00])
    site = build.LOAD_ADDRESS + image("kernel").data.rindex(nop5_nop3)  # the last: the code page
    page = site & ~0xFFF
    assert page + 0x1000 < LOG_AREA
    slots = [SlotSpec(0, page), SlotSpec(page, 0x1000, abi.MemFlag.READONLY),
             SlotSpec(page + 0x1000, BOOT_SIZE - page - 0x1000), SlotSpec(BOOT_SIZE, 2 << 20)]
    trapped: list[tuple[int, bytes]] = []
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(4 << 20), "kernel", slots=slots) as g:

        def on_patch(e: KvmExit) -> ExitAction | None:
            if isinstance(e.record, EptViolation):
                trapped.append((e.record.gpa, e.data))
                g.emulate_write(e)
                return ExitAction.SKIP
            return None

        g.start(r8=100, r9=10)  # 100 iterations, a patch after every 10th
        result = g.run(on_patch)
        assert result.reports[2] == site  # the guest told where its patch site is
        assert result.status == len(trapped) == 10  # every patch trapped, nothing else did
        assert {gpa for gpa, _ in trapped} == {site}
        # the patches alternate jmp / nop and the emulated bytes are what the guest executes next
        assert [data[0] for _, data in trapped] == [0xE9, 0x0F] * 5
        assert g.memory.read(site, 8) == nop5_nop3  # an even number of flips: back to the NOP


# -- review fixes ----------------------------------------------------------------------------------


def test_a_device_that_is_not_kvm_is_unavailable_and_not_leaked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from eptlab.errors import KvmUnavailable
    from eptlab.kvm.results import unavailable

    monkeypatch.setenv("EPTLAB_KVM_DEVICE", "/dev/null")
    fds = open_fds()
    with pytest.raises(KvmUnavailable, match="/dev/null is not a KVM device") as info:
        Kvm.open()
    assert "KVM_GET_API_VERSION" in str(info.value)
    assert open_fds() == fds  # the exception is still referenced: the fd was closed, not collected
    reason = unavailable()
    assert reason is not None and "/dev/null" in reason


@pytest.mark.kvm
def test_create_vm_closes_the_vm_fd_when_a_later_ioctl_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    def fail(self: Kvm) -> int:
        raise KvmError("KVM_GET_VCPU_MMAP_SIZE", errno.EINVAL)

    with Kvm.open() as kvm:
        fds = open_fds()
        monkeypatch.setattr(Kvm, "vcpu_mmap_size", fail)
        with pytest.raises(KvmError, match="KVM_GET_VCPU_MMAP_SIZE") as info:
            kvm.create_vm()
        assert info.value is not None and open_fds() == fds


@pytest.mark.kvm
def test_pre_fault_memory_is_called_again_until_the_whole_range_is_done(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import errno

    from eptlab.kvm import fds

    real_ioctl = fds.ioctl
    calls: list[tuple[int, int]] = []
    # what each call does: advance by n bytes and succeed, or fail with an errno, no progress
    script: list[int | str] = [4096, "EINTR", 3 * 4096, "EAGAIN", 1 << 30]

    def fake(fd: int, name: str, arg: fds.Arg = None) -> int:
        if name != "KVM_PRE_FAULT_MEMORY":
            return real_ioctl(fd, name, arg)
        assert isinstance(arg, abi.PreFaultMemory)
        calls.append((int(arg.gpa), int(arg.size)))
        step = script.pop(0)
        if isinstance(step, str):
            raise KvmError(name, getattr(errno, step))
        n = min(step, int(arg.size))
        arg.gpa, arg.size = arg.gpa + n, arg.size - n
        return 0

    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "touch") as g:
        monkeypatch.setattr(fds, "ioctl", fake)
        g.vcpu.pre_fault_memory(DATA_BASE, 64 << 10)
        # called until size is 0, retried on EINTR / EAGAIN, each call from where KVM stopped
        assert calls == [(DATA_BASE, 64 << 10), (DATA_BASE + 4096, 60 << 10),
                         (DATA_BASE + 4096, 60 << 10), (DATA_BASE + 4 * 4096, 48 << 10),
                         (DATA_BASE + 4 * 4096, 48 << 10)]
        assert not script
        # other errors are raised, and a call that never progresses does not spin for ever
        script[:] = ["EOPNOTSUPP"]
        with pytest.raises(KvmError, match="KVM_PRE_FAULT_MEMORY") as info:
            g.vcpu.pre_fault_memory(DATA_BASE, 4096)
        assert info.value.errno == errno.EOPNOTSUPP
        script[:] = ["EAGAIN"] * fds.MAX_RETRIES
        with pytest.raises(KvmError, match="no progress"):
            g.vcpu.pre_fault_memory(DATA_BASE, 4096)


@pytest.mark.kvm
def test_kvm_run_returning_eagain_for_ever_is_an_error_not_a_spin(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import ctypes
    import errno

    from eptlab.kvm import fds

    real = fds._libc

    class AlwaysEagain:  # KVM_RUN fails with EAGAIN; every other ioctl is the real one
        calls = 0

        def ioctl(self, fd: int, request: int, arg: object) -> int:
            if request != abi.IOCTLS["KVM_RUN"]:
                return int(real.ioctl(fd, request, arg))
            self.calls += 1
            ctypes.set_errno(errno.EAGAIN)
            return -1

    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "spin") as g:
        g.start()
        libc = AlwaysEagain()
        monkeypatch.setattr(fds, "_libc", libc)
        with pytest.raises(KvmError, match="EAGAIN 1000 times in a row") as info:
            g.run(timeout=30)  # the watchdog would stop it only after 30 s
        assert info.value.ioctl == "KVM_RUN" and libc.calls == fds.MAX_RETRIES


def _run_in_thread(target: object, join_timeout: float = 20.0) -> BaseException | None:
    """Run ``target()`` in a daemon thread; its exception (None if it returned). Fails the test
    instead of hanging when the thread is still running after ``join_timeout``."""
    import threading

    outcome: list[BaseException | None] = []

    def body() -> None:
        try:
            target()  # type: ignore[operator]
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    thread.join(join_timeout)
    assert not thread.is_alive(), "the guest is still running: the watchdog was off"
    return outcome[0]


@pytest.mark.kvm
def test_watchdog_stops_a_spinning_guest_in_another_thread() -> None:
    import signal

    from eptlab.kvm.backend import install_watchdog_handler

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        install_watchdog_handler()  # from the main thread, once
        error = _run_in_thread(lambda: run_guest("spin", timeout=0.3))
        assert isinstance(error, GuestError) and "watchdog" in str(error)
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.kvm
@pytest.mark.parametrize("disposition", ["SIG_DFL", "SIG_IGN"])
def test_watchdog_without_a_handler_in_another_thread_is_a_clear_error(disposition: str) -> None:
    import signal

    from eptlab.errors import WatchdogUnavailable

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        signal.signal(signal.SIGUSR1, getattr(signal, disposition))
        _run_in_thread(lambda: None)  # warm-up: a thread's first malloc arena stays mapped
        fds, maps = open_fds(), mappings()
        error = _run_in_thread(lambda: run_guest("spin", timeout=0.3))
        assert isinstance(error, WatchdogUnavailable)
        assert "install_watchdog_handler" in str(error)
        del error
        assert (open_fds(), mappings()) == (fds, maps)
    finally:
        signal.signal(signal.SIGUSR1, previous)


@pytest.mark.kvm
def test_kvm_failures_are_counted_as_such_not_as_an_architectural_exit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    exits = iter([InternalError(1, (2,)), InternalError(3, ()), HltExit()])
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "halt", user=False) as g:
        g.start()
        monkeypatch.setattr(g.vcpu, "run", lambda: next(exits))
        seen: list[object] = []

        def accept_failures(e: KvmExit) -> ExitAction | None:
            if isinstance(e.record, KvmFailure):
                seen.append(e.record)
                return ExitAction.RETRY  # nothing ran: enter again
            return None

        result = g.run(accept_failures)
    assert len(seen) == 2 and result.halted
    assert dict(result.exits) == {ExitReason.HLT: 1} and result.failures == 2
    assert result.exit_names() == {"HLT": 1, "KVM_FAILURE": 2} and result.total_exits == 3
    assert "KVM_FAILURE" not in ExitReason.__members__  # its own name, no SDM reason reused


@pytest.mark.kvm
@pytest.mark.parametrize("action", [ExitAction.SKIP, ExitAction.STEP])
def test_an_action_kvm_cannot_carry_out_is_an_error_not_ignored(
    monkeypatch: pytest.MonkeyPatch, action: ExitAction
) -> None:
    """A KVM failure executed nothing: skipping it (or single-stepping, which this backend does
    not do) is refused with the record, not silently turned into a re-entry."""
    exits = iter([InternalError(1, ()), HltExit()])
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "halt", user=False) as g:
        g.start()
        monkeypatch.setattr(g.vcpu, "run", lambda: next(exits))
        with pytest.raises(GuestError, match=f"answered {action.name}") as info:
            g.run(lambda e: action if isinstance(e.record, KvmFailure) else None)
    assert isinstance(info.value.record, KvmFailure)


@pytest.mark.kvm
@pytest.mark.parametrize(("guest", "memory", "match"),
                         [("no-such-guest", 8 << 20, "guest"),  # the image cannot be built
                          ("halt", 7 << 20, "memory")])  # no 2 MiB slot layout for 7 MiB
def test_an_early_construction_error_releases_owned_memory(
    guest: str, memory: int, match: str
) -> None:
    with Kvm.open() as kvm:
        run_guest("halt", kvm=kvm, user=False)  # warm-up: image built, CPUID cached
        fds, maps = open_fds(), mappings()
        with pytest.raises(ConfigError, match=match) as info:
            KvmGuest(kvm, GuestMemory(memory), guest)
        # the exception (and its frames) is still referenced: released by the guest, not the GC
        assert info.value is not None
        assert (open_fds(), mappings()) == (fds, maps)


@pytest.mark.kvm
@pytest.mark.parametrize("readonly", [0, abi.MemFlag.READONLY])
def test_slot_flags_change_only_when_kvm_takes_the_new_slot(readonly: int) -> None:
    bogus = 1 << 7  # not a memslot flag: KVM answers EINVAL
    with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), "touch") as g:
        before = list(g.slots)
        with pytest.raises(KvmError, match="KVM_SET_USER_MEMORY_REGION"):
            g.set_slot_flags(1, readonly | bogus)
        assert g.slots == before
        # and the slot KVM has is still the old one: the guest's writes land in memory
        g.start(r8=DATA_BASE, r9=4, r10=4096, r11=9, r12=1)
        assert g.run().status == 0
        assert [g.memory.read_u64(DATA_BASE + i * 4096) for i in range(4)] == [9] * 4
        g.set_slot_flags(1, abi.MemFlag.LOG_DIRTY_PAGES)  # a valid change is recorded
        assert g.slots[1].flags == abi.MemFlag.LOG_DIRTY_PAGES


@pytest.mark.kvm
@pytest.mark.parametrize("user", [False, True])
def test_tr_is_loaded_from_a_64_bit_tss_descriptor_in_the_guest_gdt(user: bool) -> None:
    import struct

    from eptlab.kvm.backend import image

    for name in build.available():
        img = image(name)
        with Kvm.open() as kvm, KvmGuest(kvm, GuestMemory(8 << 20), name, user=user) as g:
            tr = g.vcpu.get_sregs().tr
        # decode the GDT entry TR selects straight from the image bytes (SDM Vol. 3A §8.2.3)
        assert tr.selector % 8 == 0 and tr.selector + 15 <= img.gdt_limit
        lo, hi = struct.unpack_from("<QQ", img.data, img.gdt - build.LOAD_ADDRESS + tr.selector)
        access = lo >> 40 & 0xFF
        assert access & 0x80 and not access & 0x10  # present, a system descriptor
        assert access & 0xF == 0xB == tr.type  # a busy 64-bit TSS, as after LTR
        base = (lo >> 16 & 0xFFFFFF) | (lo >> 56 & 0xFF) << 24 | (hi & 0xFFFFFFFF) << 32
        limit = (lo & 0xFFFF) | (lo >> 48 & 0xF) << 16
        assert (tr.base, tr.limit) == (base, limit) and limit >= 0x67
        # the TSS lies inside the image, clear of the GDT
        assert img.gdt + img.gdt_limit < base and base + limit < build.LOAD_ADDRESS + len(img.data)
