"""A disk under a virtual machine: an image of 4 KiB blocks with deterministic contents and a
latency model (command overhead, seeks, transfer rate), for the double-caching experiment.

Block ``b`` of image ``i`` holds 512 words: word 0 is a tag naming the block
(:func:`block_tag`), the others a hash of ``(i, b, word)``, so any host frame can be recognised
as a copy of a disk block by its contents alone (:meth:`Disk.holds_copy`).

Time is modelled, not measured: a read request costs the command overhead, a seek when it does
not start where the previous one ended (a head movement and half a rotation on a hard disk,
nothing on flash), and the transfer at the disk's rate. Requests are served one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from ..arch.bits import ENTRIES_PER_TABLE, PAGE_SIZE
from ..costs import CostProfile, active_profile
from ..errors import AddressError, ConfigError

Block = npt.NDArray[np.uint64]

TAG_MARK = 0xD15C << 48  # bits 63:48 of word 0 of every disk block
_MIX = np.uint64(0x9E3779B97F4A7C15)
_WORDS = np.arange(ENTRIES_PER_TABLE, dtype=np.uint64)


def block_tag(image: int, block: int) -> int:
    """Word 0 of block ``block`` of image ``image`` (image < 2^8, block < 2^40)."""
    return TAG_MARK | image << 40 | block


def block_contents(image: int, block: int) -> Block:
    """The 4 KiB of a disk block as 512 words."""
    seed = np.uint64((image << 40 | block) * 0x100000001B3 & (1 << 64) - 1)
    words = ((_WORDS + seed) * _MIX) ^ (seed >> np.uint64(7))
    words[0] = block_tag(image, block)
    return words


@dataclass(frozen=True)
class DiskModel:
    """Latency of one read request: ``request_us`` always, ``seek_us`` when the request does not
    continue the previous one, and the transfer at ``mib_per_s``."""

    name: str
    request_us: float
    seek_us: float
    mib_per_s: float

    def __post_init__(self) -> None:
        if self.request_us < 0 or self.seek_us < 0 or self.mib_per_s <= 0:
            raise ConfigError(
                f"DiskModel({self.name}).latency",
                "request_us and seek_us must be >= 0 and mib_per_s > 0",
            )

    def read_us(self, blocks: int, *, sequential: bool) -> float:
        transfer = blocks * PAGE_SIZE / (self.mib_per_s * (1 << 20)) * 1e6
        return self.request_us + (0.0 if sequential else self.seek_us) + transfer


DISK_NAMES = ("nvme", "ssd", "hdd")
"""NVMe flash (no seek), a SATA SSD (no seek), a 7,200 rpm hard disk (seek + half rotation)."""


def disk_models(profile: CostProfile | None = None) -> dict[str, DiskModel]:
    """The disks, priced by ``profile`` (the active cost profile unless given): keys
    ``{name}_request_us``, ``{name}_mib_per_s`` and ``hdd_seek_us``; flash does not seek."""
    p = active_profile() if profile is None else profile
    return {
        name: DiskModel(
            name,
            request_us=p[f"{name}_request_us"],
            seek_us=p["hdd_seek_us"] if name == "hdd" else 0.0,
            mib_per_s=p[f"{name}_mib_per_s"],
        )
        for name in DISK_NAMES
    }


def disk_model(name: str, profile: CostProfile | None = None) -> DiskModel:
    if name not in DISK_NAMES:
        raise ConfigError("disk", f"{name!r} is not one of {', '.join(DISK_NAMES)}")
    return disk_models(profile)[name]


@dataclass
class DiskCounters:
    reads: int = 0  # read requests (commands) the disk served
    blocks: int = 0  # 4 KiB blocks transferred
    busy_us: float = 0.0  # modelled time spent serving them


class Disk:
    """One disk image of ``blocks`` 4 KiB blocks on a device with ``model`` latencies."""

    def __init__(self, blocks: int, model: DiskModel, *, image: int = 1) -> None:
        if blocks <= 0:
            raise ConfigError("blocks", f"a disk needs at least one block, got {blocks}")
        if not 0 <= image < 256:
            raise ConfigError("image", f"{image} is not in 0..255")
        self.blocks, self.model, self.image = blocks, model, image
        self.counters = DiskCounters()
        self._head = -1  # the block after the last one read (where a sequential read starts)

    def contents(self, block: int) -> Block:
        self._check(block, 1)
        return block_contents(self.image, block)

    def read(self, first: int, count: int) -> tuple[list[Block], float]:
        """Read ``count`` blocks from ``first`` in one request: their contents and the time."""
        self._check(first, count)
        took = self.model.read_us(count, sequential=first == self._head)
        self._head = first + count
        self.counters.reads += 1
        self.counters.blocks += count
        self.counters.busy_us += took
        return [block_contents(self.image, b) for b in range(first, first + count)], took

    def holds_copy(self, words: Block) -> int | None:
        """The block whose contents ``words`` are (all 4 KiB equal), or None."""
        tag = int(words[0])
        if tag >> 48 != TAG_MARK >> 48 or (tag >> 40) & 0xFF != self.image:
            return None
        block = tag & ((1 << 40) - 1)
        if block >= self.blocks:
            return None
        return block if np.array_equal(words, block_contents(self.image, block)) else None

    def _check(self, first: int, count: int) -> None:
        if count <= 0 or first < 0 or first + count > self.blocks:
            raise AddressError(
                f"blocks {first}..{first + count - 1} are outside the disk ({self.blocks} blocks)"
            )
