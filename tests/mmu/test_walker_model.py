"""Property tests: the reference walker against an independent dictionary model.

Hypothesis builds random guest address spaces (4- or 5-level paging; 4 KiB, 2 MiB and 1 GiB guest
pages at GVAs in both canonical halves) over random EPT backings (4- or 5-level EPT; 4 KiB, 2 MiB
and 1 GiB EPT pages, each with its own rights, some guest-physical ranges left unbacked), then
asks random questions. The model below knows only the mappings it asked for, kept as plain
intervals (GVA -> GPA -> HPA), and the SDM rules restated as lists of denials. For every question
the result kind, addresses, fault error code / exit qualification and the number of memory
references must agree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from hypothesis import event, given, settings
from hypothesis import strategies as st

from eptlab.arch import Access, Mode, PageSize
from eptlab.arch.exits import EptViolation, GuestFault
from eptlab.mmu import Translation
from eptlab.mmu.scenario import NestedSpace

R, W, X = Access.READ, Access.WRITE, Access.FETCH
SUP, USR = Mode.SUPERVISOR, Mode.USER
SIZES = [PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G]
EPT_PERMS = ["rwx", "r-x", "rw-", "r--", "--x", "---"]

# page-fault error code (SDM Vol. 3A §4.7) and EPT qualification (SDM Vol. 3C Table 28-7)
P, WR, US, RSVD, ID = 1, 2, 4, 8, 16
Q_ACCESS = {R: 1, W: 2, X: 4}
Q_RIGHTS = {"r": 8, "w": 16, "x": 32}
Q_GLA, Q_FINAL, Q_USER, Q_WRITABLE, Q_XD = 1 << 7, 1 << 8, 1 << 9, 1 << 10, 1 << 11

CR0_PE, CR0_WP, CR0_PG = 1, 1 << 16, 1 << 31
CR4_SMEP, CR4_SMAP = 1 << 20, 1 << 21
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_AC = 1 << 18

Item = TypeVar("Item")
Query = tuple[str, int, int, int, Access, Mode]  # kind, page, random bits, bit, access, mode

TOP_INDEX = [0, 1, 255, 256, 257, 511]  # 256.. selects the upper canonical half
LOW_INDEX = [0, 1, 2, 510, 511]


def span(level: int) -> int:
    """Bytes covered by one entry at ``level`` (1 -> 4 KiB, 2 -> 2 MiB, ...)."""
    return 1 << (12 + 9 * (level - 1))


def canonical(linear: int, width: int) -> int:
    linear &= (1 << width) - 1
    return linear - (1 << width) + (1 << 64) if linear >> (width - 1) else linear


# -- the model --------------------------------------------------------------------------------


@dataclass(frozen=True)
class EptPiece:
    gpa: int
    size: int
    hpa: int | None  # None: a guest page-table page (rwx, HPA not needed by the model)
    perms: str


@dataclass(frozen=True)
class GuestPage:
    linear: int  # truncated to the paging width
    size: int
    gpa: int
    writable: bool
    user: bool
    xd: bool


@dataclass
class Model:
    n: int
    m: int
    nxe: bool
    wp: bool
    smep: bool
    smap: bool
    ac: bool
    pages: list[GuestPage] = field(default_factory=list)
    pieces: list[EptPiece] = field(default_factory=list)

    @property
    def width(self) -> int:
        return 12 + 9 * self.n

    @staticmethod
    def _descend(
        top: int, address: int, items: Sequence[tuple[int, int, Item]]
    ) -> tuple[int, Item | None]:
        """Walk a radix tree that holds exactly ``items`` ((start, size, item) intervals): the
        level where the walk stops and the item mapped there (None: that entry is not present).
        An entry is present iff some interval lies under it, and maps a page iff an interval
        covers exactly its span."""
        for level in range(top, 0, -1):
            region = address & ~(span(level) - 1)
            under = [(s, n, i) for s, n, i in items if s < region + span(level) and region < s + n]
            if not under:
                return level, None
            exact = [i for _, n, i in under if n == span(level)]
            if exact:
                return level, exact[0]
        raise AssertionError("a level-1 entry always maps a page")

    def guest_denied(self, page: GuestPage, access: Access, mode: Mode) -> bool:
        """SDM Vol. 3A §4.6.1, written as the list of ways an access is refused."""
        denials = [
            mode == USR and not page.user,
            access == W and not page.writable and (mode == USR or self.wp),
            access == X and self.nxe and page.xd,
            access == X and mode == SUP and page.user and self.smep,
            access != X and mode == SUP and page.user and self.smap and not self.ac,
        ]
        return any(denials)

    def predict(self, gva: int, access: Access, mode: Mode) -> dict[str, object]:
        top = gva >> (self.width - 1)
        if top not in (0, (1 << (65 - self.width)) - 1):
            return {"kind": "gp", "count": 0}
        error = (
            (WR if access == W else 0)
            | (US if mode == USR else 0)
            | (ID if access == X and (self.nxe or self.smep) else 0)
        )
        linear = gva & ((1 << self.width) - 1)
        level, page = self._descend(self.n, linear, [(p.linear, p.size, p) for p in self.pages])
        guest_refs = (self.n - level + 1) * (self.m + 1)  # table pages: 4 KiB EPT pages
        if page is None:
            return {"kind": "pf", "error": error, "count": guest_refs}
        if page.xd and not self.nxe:
            return {"kind": "pf", "error": P | RSVD | error, "count": guest_refs}
        if self.guest_denied(page, access, mode):
            return {"kind": "pf", "error": P | error, "count": guest_refs}
        gpa = page.gpa + (linear - page.linear)
        elevel, piece = self._descend(self.m, gpa, [(e.gpa, e.size, e) for e in self.pieces])
        count = guest_refs + self.m - elevel + 1
        qual_base = (
            Q_ACCESS[access]
            | Q_GLA
            | Q_FINAL
            | (Q_USER if page.user else 0)
            | (Q_WRITABLE if page.writable else 0)
            | (Q_XD if page.xd and self.nxe else 0)
        )
        if piece is None or piece.perms == "---":
            return {"kind": "ept", "gpa": gpa, "qual": qual_base, "count": count}
        if "rwx"[access] not in piece.perms:
            rights = sum(Q_RIGHTS[c] for c in piece.perms if c != "-")
            return {"kind": "ept", "gpa": gpa, "qual": qual_base | rights, "count": count}
        assert piece.hpa is not None
        return {
            "kind": "ok",
            "gpa": gpa,
            "hpa": piece.hpa + (gpa - piece.gpa),
            "count": count,
            "guest_page": page.size,
            "ept_page": piece.size,
        }


def observe(t: Translation) -> dict[str, object]:
    if t.ok:
        return {
            "kind": "ok",
            "gpa": t.gpa,
            "hpa": t.hpa,
            "count": t.count,
            "guest_page": t.guest_page,
            "ept_page": t.ept_page,
        }
    if isinstance(t.fault, GuestFault):
        if t.fault.vector == 13:
            assert t.fault.error_code == 0 and t.fault.address == t.gva
            return {"kind": "gp", "count": t.count}
        assert t.fault.vector == 14 and t.fault.address == t.gva
        return {"kind": "pf", "error": t.fault.error_code, "count": t.count}
    assert isinstance(t.exit, EptViolation), t.exit
    assert t.exit.gla == t.gva
    return {"kind": "ept", "gpa": t.exit.gpa, "qual": t.exit.qualification, "count": t.count}


# -- strategies ---------------------------------------------------------------------------------


@st.composite
def page_specs(draw: st.DrawFn, n: int) -> dict[str, object]:
    guest_size = draw(st.sampled_from(SIZES))
    ept_size = draw(st.sampled_from(SIZES))
    indices = [draw(st.sampled_from(TOP_INDEX))] + [
        draw(st.sampled_from(LOW_INDEX)) for _ in range(n - 1)
    ]
    linear = 0
    for level, index in zip(range(n, 0, -1), indices, strict=True):
        if level >= PageSize(guest_size).level:
            linear |= index << (12 + 9 * (level - 1))
    if ept_size > guest_size:
        slot = draw(st.integers(0, ept_size // guest_size - 1))  # where the page sits in it
        backed = [0]
    else:
        slot = 0
        pieces = guest_size // ept_size
        backed = draw(st.lists(st.integers(0, pieces - 1), min_size=1, max_size=2, unique=True))
    return {
        "linear": linear,
        "guest_size": guest_size,
        "ept_size": ept_size,
        "slot": slot,
        "backed": backed,
        "perms": [draw(st.sampled_from(["rwx"] * 4 + EPT_PERMS)) for _ in backed],
        "writable": draw(st.booleans()),
        "user": draw(st.booleans()),
        "xd": draw(st.booleans()),
    }


@st.composite
def queries(draw: st.DrawFn, n: int, npages: int) -> Query:
    kind = draw(st.sampled_from(["backed"] * 4 + ["page", "random", "non-canonical"]))
    return (
        kind,
        draw(st.integers(0, max(npages - 1, 0))),
        draw(st.integers(0, (1 << 30) - 1)),  # offset / random bits
        draw(st.integers(0, 63)),
        draw(st.sampled_from([R, W, X])),
        draw(st.sampled_from([SUP, USR])),
    )


@st.composite
def scenarios(draw: st.DrawFn) -> dict[str, object]:
    n = draw(st.sampled_from([4, 5]))
    specs = draw(st.lists(page_specs(n), min_size=1, max_size=7))
    return {
        "n": n,
        "m": draw(st.sampled_from([4, 5])),
        "ept_ad": draw(st.booleans()),
        "nxe": draw(st.booleans()),
        "wp": draw(st.booleans()),
        "smep": draw(st.booleans()),
        "smap": draw(st.booleans()),
        "ac": draw(st.booleans()),
        "specs": specs,
        "queries": draw(st.lists(queries(n, len(specs)), min_size=1, max_size=12)),
    }


def build(sc: dict[str, Any]) -> tuple[NestedSpace, Model]:
    n, m = sc["n"], sc["m"]
    cr0 = CR0_PE | CR0_PG | (CR0_WP if sc["wp"] else 0)
    cr4 = (CR4_SMEP if sc["smep"] else 0) | (CR4_SMAP if sc["smap"] else 0)
    efer = EFER_LME | EFER_LMA | (EFER_NXE if sc["nxe"] else 0)
    space = NestedSpace.create(
        guest_levels=n, ept_levels=m, ept_ad=sc["ept_ad"], cr0=cr0, cr4_extra=cr4, efer=efer
    )
    if sc["ac"]:
        space.guest.rflags |= RFLAGS_AC
    model = Model(n, m, sc["nxe"], sc["wp"], sc["smep"], sc["smap"], sc["ac"])
    width = 12 + 9 * n
    for spec in sc["specs"]:
        gsize, esize = int(spec["guest_size"]), int(spec["ept_size"])
        linear = spec["linear"]
        if any(p.linear < linear + gsize and linear < p.linear + p.size for p in model.pages):
            continue  # overlaps a page mapped before: not part of this space
        block = space.guest_frames.alloc(PageSize(max(gsize, esize)))
        gpa = block + spec["slot"] * gsize
        space.tables.map(
            canonical(linear, width),
            gpa,
            PageSize(gsize),
            writable=spec["writable"],
            user=spec["user"],
            xd=spec["xd"],
        )
        model.pages.append(
            GuestPage(linear, gsize, gpa, spec["writable"], spec["user"], spec["xd"])
        )
        for index, perms in zip(spec["backed"], spec["perms"], strict=True):
            piece = block + index * esize
            hpa = space.map_ept(piece, PageSize(esize), perms)
            model.pieces.append(EptPiece(piece, esize, hpa, perms))
    for table in space.tables.tables:  # guest page-table pages: 4 KiB, rwx
        model.pieces.append(EptPiece(table, 4096, None, "rwx"))
    return space, model


def query_address(model: Model, q: Query, rng_pages: list[GuestPage]) -> int:
    kind, which, bits, bit, _, _ = q
    width = model.width
    if kind in ("backed", "page") and rng_pages:
        page = rng_pages[which % len(rng_pages)]
        offset = bits % page.size
        if kind == "backed":
            inside = [
                e
                for e in model.pieces
                if e.hpa is not None and e.gpa < page.gpa + page.size and page.gpa < e.gpa + e.size
            ]
            if inside:
                e = inside[bits % len(inside)]
                lo, hi = max(e.gpa, page.gpa), min(e.gpa + e.size, page.gpa + page.size)
                offset = lo - page.gpa + bits % (hi - lo)
        return canonical(page.linear + offset, width)
    linear = 0
    for level in range(model.n, 0, -1):
        pool = TOP_INDEX if level == model.n else LOW_INDEX
        linear |= pool[(bits >> (3 * level)) % len(pool)] << (12 + 9 * (level - 1))
    address = canonical(linear | (bits & 0xFFF), width)
    if kind == "non-canonical":
        address ^= 1 << (width + bit % (64 - width))  # one upper bit no longer matches
    return address


@settings(max_examples=80, deadline=None)
@given(scenarios())
def test_walker_agrees_with_the_dictionary_model(sc: dict[str, Any]) -> None:
    space, model = build(sc)
    walker = space.walker()
    for q in sc["queries"]:
        gva = query_address(model, q, model.pages)
        access, mode = q[4], q[5]
        expected = model.predict(gva, access, mode)
        t = walker.translate(gva, access, mode)
        got = observe(t)
        assert got == expected, (hex(gva), access, mode)
        event(
            f"outcome {got['kind']}"
            + (f" {got.get('guest_page')}/{got.get('ept_page')}" if got["kind"] == "ok" else "")
        )
        # A/D flags are sticky: asking again gives the same answer and the same references
        again = walker.translate(gva, access, mode)
        assert observe(again) == got
        assert [r.address for r in again.references] == [r.address for r in t.references]


@settings(max_examples=60, deadline=None)
@given(scenarios())
def test_every_mapped_byte_translates_where_the_model_says(sc: dict[str, Any]) -> None:
    """Exhaustive over the space's pages instead of random questions: for every guest page and
    every EPT piece backing it with read rights, a supervisor read of its first and last byte
    (SMAP off) lands on the model's HPA with the model's reference count."""
    sc = {**sc, "smap": False}
    space, model = build(sc)
    walker = space.walker()
    for page in model.pages:
        for e in model.pieces:
            if e.hpa is None or not (e.gpa < page.gpa + page.size and page.gpa < e.gpa + e.size):
                continue
            lo, hi = max(e.gpa, page.gpa), min(e.gpa + e.size, page.gpa + page.size)
            for gpa in (lo, hi - 1):
                gva = canonical(page.linear + gpa - page.gpa, model.width)
                expected = model.predict(gva, R, SUP)
                got = observe(walker.translate(gva, R, SUP))
                assert got == expected, hex(gva)
                if "r" in e.perms and not (page.xd and not model.nxe):
                    assert got["kind"] == "ok" and got["hpa"] == e.hpa + gpa - e.gpa
