"""Decoding a KVM_EXIT_IO without a vCPU: a ``kvm_run`` structure laid in a plain buffer. A
``rep outsb`` of 4 bytes exits once with ``count = 4`` (KVM API: the data is ``size * count``
bytes at ``data_offset``)."""

from __future__ import annotations

from eptlab.kvm import abi
from eptlab.kvm.fds import VcpuFd
from eptlab.kvm.vcpu_exit import IoIn, IoOut


def decode(size: int, count: int, direction: int) -> object:
    buf = bytearray(8192)
    run = abi.Run.from_buffer(buf)
    run.exit_reason = abi.ExitReason.IO
    io = run.exit.io
    io.direction, io.size, io.port, io.count, io.data_offset = direction, size, 0x3F8, count, 4096
    buf[4096 : 4096 + 16] = bytes(range(0x41, 0x41 + 16))
    vcpu = object.__new__(VcpuFd)  # no fd: only the decoder runs
    vcpu.__dict__.update(_run=run, _run_mmap=buf)
    return vcpu._decode()


def test_rep_out_carries_size_times_count_bytes() -> None:
    assert decode(1, 4, abi.IO_OUT) == IoOut(0x3F8, b"ABCD")
    assert decode(2, 3, abi.IO_OUT) == IoOut(0x3F8, b"ABCDEF")
    assert decode(1, 1, abi.IO_OUT) == IoOut(0x3F8, b"A")


def test_in_asks_for_size_bytes() -> None:
    assert decode(4, 1, abi.IO_IN) == IoIn(0x3F8, 4)
