"""Where the report's numbers come from: each section says whether they are simulated (and with
which cost profile, from which sources) or measured (on which KVM), and the "Model and limits"
section lists every profile value with its source, the model's simplifications and the results
that hold by construction of the model."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pandas as pd

from ..costs import SOURCE_KINDS, CostProfile
from .sections import Section, read_json

SIMULATED, MEASURED, ARCHITECTURAL = "simulated", "measured", "architectural"

SIMPLIFICATIONS = [
    "Costs are serial. Each memory reference pays the full latency of the level that serves it, "
    "one after another: no out-of-order overlap, no memory-level parallelism, no concurrent page "
    "walks. A real core overlaps independent misses, so the model overstates the cycles of "
    "streams with independent accesses (random, GUPS) and fits dependent chains (pointer "
    "chasing) best.",
    "DRAM is one flat latency (dram_latency): no banks, row buffers, queueing, bandwidth limit "
    "or NUMA distance.",
    "The caches keep no dirty lines: a write allocates its line (charged like a read) and "
    "write-backs cost nothing. Replacement is LRU in every structure; sizes are rounded to 2^k "
    "sets (the L2 is 1 MiB where the parts have 1.25 or 2 MiB).",
    "Hypervisor work is priced, not executed: a VM exit, an INVEPT, an EPT edit, a page copy, a "
    "frame allocation, an emulated access each cost the profile's fixed number of cycles; the "
    "handler's own memory traffic does not go through the simulated TLBs and caches.",
    "One fixed clock (clock_ghz) turns cycles into time: no turbo, no frequency changes.",
    "Memory encryption adds its latency in series to each DRAM read, with no bandwidth or "
    "queueing effect and no MAC cache or integrity tree.",
    "Disks serve one request at a time (queue depth 1) with a fixed latency, a seek for a "
    "non-sequential request (hard disk) and a transfer at a fixed bandwidth.",
    "The TLB and paging-structure-cache geometry is that of a Skylake-SP/Ice Lake class core "
    "(eptlab.mmu.config.TlbConfig), not measured on this machine.",
]

BY_CONSTRUCTION: dict[str, list[str]] = {
    "walks": [
        "Reference counts of a cold walk (24 for 4-level guest paging under 4-level EPT) are "
        "the architecture's (SDM Vol. 3C §29.3), not a model result; they carry no cost.",
    ],
    "nested-overhead": [
        "Walk reference counts follow the SDM's walk; only cycles_per_access depends on the "
        "profile (cache and DRAM latencies, walk start, STLB and paging-structure-cache costs).",
    ],
    "cow-fork": [
        "fork_cycles, cow_cycles, full_copy_cycles, reset_cycles, loop_cycles and the re-fork "
        "columns are event counts times profile prices (ept_edit_cycles, invept_cycles, "
        "vmexit_cycles, copy_bytes_per_cycle, frame_alloc_cycles, vm_create_cycles, "
        "pml_entry_cycles) plus the engine's cycles for the guest's accesses: every ratio "
        "restates those prices, none is measured.",
        "An eager fork edits one EPT entry per guest page and a lazy one takes one exit per page "
        "touched, so where lazy stops being cheaper follows from vmexit_cycles against "
        "ept_edit_cycles; the parent's first writes fault after a fork because the fork made "
        "its pages read-only (exits equal pages written, by construction).",
        "Write-protection tracking takes one exit per dirtied page per run and PML one per 512 "
        "logged pages (the log's size, SDM Vol. 3C §29.3.6); byte-exact resets are checked on "
        "every run, not assumed.",
    ],
    "prefetch-hypercall": [
        "Exit, INVEPT, shootdown, page backing, guest-fault, async-PF event, task-switch and "
        "swap-in cycles are profile prices; the stale-use counts are checked by the checker on "
        "every access, not assumed.",
        "Back only on lazy memory and no hint on backed memory start from the same state (every "
        "page mapped, caches cold), as do back + warm and warm only: their guest-side columns "
        "agree by construction (up to where the remaps land against the hint's steps); "
        "prefetch_cycles tells them apart.",
        "With backing=zero the async-PF rows cost more than no hint by construction (two events, "
        "two task switches and a kick exit against a sub-microsecond zero-fill); KVM would not "
        "take the async path there.",
    ],
    "double-caching": [
        "One EPT violation per first touch of a guest-physical page (ept_violations equals "
        "guest_pages_allocated) follows from lazy backing by construction.",
        "io_ms, ept_ms and guest_ms are counts times profile prices and the profile's disk "
        "latencies and bandwidths; no device or host CPU was timed.",
        "On the DAX path window_violations equals the distinct window pages read because the "
        "window is mapped one 4 KiB page per first access; a hit's cost is profile prices, a "
        "miss adds the disk model's time.",
        "init_on_alloc=0 leaves the EPT violation count unchanged because the model (like KVM) "
        "makes the EPT entry only at the guest's first access; the cycles it saves are the "
        "profile's frame and zeroing prices moved from the exit to the device's host fault.",
        "Host readahead's cut in disk reads on a sequential read is fixed-window arithmetic "
        "(one request per missing run plus the window), not a measured readahead policy.",
    ],
    "aslr-side-channel": [
        "The exact attacker is idealized: it gets one LLC set index per reference (AnC after "
        "sliding); the entropy floors with noise 0 are arithmetic over the leaked address bits.",
        "The prime+probe attacker measures through the engine's LRU cache model, where an "
        "evicted line always reads slow and nothing else runs: its noise is the victim's own "
        "reads and walks, not a random draw. No replacement-policy noise, prefetcher, other "
        "core or interrupt is modelled.",
        "Re-randomizing in 2 MiB blocks cannot change HPA bits 6-20, the unsliced LLC index: "
        "with the slice hash off, migration leaves the data line's set where it was by "
        "construction; walk references leak line offsets (guest-physical bits) under every "
        "layout and every migration.",
    ],
    "integrity-monitor": [
        "The trap modes detect and prevent every hook at its write because every write to a "
        "write-protected page exits (by construction of trapping); monitor_cycles is exits "
        "times vmexit_cycles plus counted work times profile prices.",
        "A page-table remapping attack is invisible to write traps on the code's guest-physical "
        "pages and to PML because none of its stores touches a code page; HLAT neutralizes it "
        "because the HLAT tables the code is translated through are not the ones it edits; a "
        "write through an alias is trapped because EPT permissions belong to the "
        "guest-physical page. All three follow from the architecture as modelled.",
        "The hlat rows run on the reference walker (no TLB, no caches, no cycles): their exits "
        "and outcomes are exact, their walk references are those of cold walks.",
    ],
    "trap-debugger": [
        "Detection follows the sampling theory (expected_detection_rate, over the bug writes the "
        "filter reports) because the sample is uniform; debugger_cycles is exits times "
        "vmexit_cycles plus counted work times profile prices, and the overhead percentages are "
        "against a guest that does nothing but heap accesses (an upper bound).",
        "Zero false positives with the default filter hold by construction: its allow-list "
        "accepts exactly the link stores the modelled allocator makes. Every same-value bug is "
        "dismissed by the silent-store rule by its definition; which NULL and freed-pointer bugs "
        "a rule admits depends on where the injected writes land (word 0 of a free chunk) and on "
        "what memory holds there, which the model decides.",
        "An alarm's instruction pointer is the bug's because the stream supplies every access's "
        "ip and the run loop copies it at the exit: context_matches checks that plumbing.",
    ],
    "tsx-aborts": [
        "Every VM exit inside a transaction aborts it: ept_aborts equals ept_violations_in_tx "
        "by the model's rule, an accounting invariant and not a finding.",
        "Accessed/dirty flags, PML entries and cache fills of aborted transactions are not "
        "rolled back (a model choice). Cycles are engine cycles plus counts times profile "
        "prices (rtm_commit/rtm_abort/lock_cycles measured on this machine); throughput takes "
        "vCPUs as parallel and work under the lock as serial, lock waiting is not priced.",
    ],
    "tsx-drk": [
        "A probe that exits is slower by construction (exit round trip and handler work are "
        "added to the guest's time); the run measures whether walk-time spread stays below "
        "that gap. No timing noise beyond the modelled caches and TLB is added.",
    ],
    "memory-encryption": [
        "Extra cycles equal decrypt x (DRAM lines of encrypted classes) + MAC x (lines with a "
        "MAC) + RMP lookup x (RMP-cache misses) exactly, because encryption changes no hit or "
        "miss; so without RMP checks no run slows down by more than (decrypt + MAC latency) / "
        "DRAM latency. That bound and the identity are the model's, checked on every pair of "
        "runs, not findings. Which classes each preset encrypts, that only nested walks are "
        "RMP-checked (one check per entry read and per walked data page) and that TDX's secure "
        "EPT costs one decryption like MKTME's TME-encrypted EPT are the model's rules; the RMP "
        "lookup latency and RMP cache size are assumed. Costs add in series (no memory-level "
        "parallelism).",
    ],
    "kvm": [
        "Times in the KVM section are measured on this host; exit counts come from the VMM and "
        "from KVM's own statistics. The cross-checks compare counts and page sets, never times.",
    ],
}


def profile_summary(directory: Path, name: str) -> dict[str, Any] | None:
    """The ``profile`` a run recorded in ``NAME.json`` (None for results made before)."""
    data = read_json(directory / f"{name}.json")
    profile = data.get("profile")
    return profile if isinstance(profile, dict) and "values" in profile else None


def source_counts(profile: dict[str, Any]) -> str:
    counts = Counter(str(v.get("source")) for v in profile["values"].values())
    return ", ".join(f"{counts[k]} {k}" for k in SOURCE_KINDS if counts[k])


def simulated_words(profile: dict[str, Any] | None) -> str:
    """The provenance line of a simulated section."""
    if profile is None:
        return (
            "Computed by eptlab's simulated machine. These results do not record their cost "
            "profile (they predate profiles): their cycles used the constants of that time."
        )
    return (
        f"Computed by eptlab's simulated machine; cycles and times priced by cost profile "
        f"'{profile['name']}' ({source_counts(profile)} values; see Model and limits)."
    )


def flavour_label(table: pd.DataFrame) -> str:
    """``kvm_pvm, shadow paging``: the KVM module and its second-level paging ("" unknown)."""
    if "kvm_module" not in table or "tdp" not in table:
        return ""
    tdp = table.tdp.iloc[0]
    if tdp is None or pd.isna(tdp):
        paging = "paging unknown"
    else:
        paging = "hardware EPT/NPT" if bool(tdp) else "shadow paging"
    return f"{table.kvm_module.iloc[0]}, {paging}"


def measured_words(table: pd.DataFrame) -> str:
    """The provenance line of the KVM section: which KVM, which second-level paging."""
    label = flavour_label(table)
    if not label:
        return "On this host's KVM (flavour not recorded)."
    return f"On this host's KVM ({label}): times are measured here, no cost profile involved."


def prefetcher_words() -> str:
    """What the cache model does about hardware prefetching, read from its configuration."""
    from ..mmu.config import CacheConfig

    prefetcher = getattr(CacheConfig(), "prefetcher", None)
    kind = getattr(prefetcher, "kind", None)
    if kind is None or kind == "off":
        return (
            "There is no hardware prefetcher in the cache model: every line of a sequential "
            "stream that misses pays a full DRAM latency."
        )
    return (
        f"The cache model has a {kind} prefetcher on by default "
        f"(CacheConfig.prefetcher = {prefetcher}); prefetches are charged no cycles and "
        "page-walk references are never prefetched."
    )


def distinct_profiles(out: Path, names: list[str]) -> list[tuple[dict[str, Any], list[str]]]:
    """The profiles the experiments under ``out`` ran with, each with the experiments that
    used it (results without a recorded profile are left out)."""
    found: dict[str, tuple[dict[str, Any], list[str]]] = {}
    for name in names:
        profile = profile_summary(out / name, name)
        if profile is None:
            continue
        key = json.dumps(profile["values"], sort_keys=True) + str(profile["name"])
        found.setdefault(key, (profile, []))[1].append(name)
    return list(found.values())


def values_table(profile: dict[str, Any]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "key": key,
                "value": v.get("value"),
                "unit": v.get("unit", ""),
                "source": v.get("source"),
                "reference": v.get("ref", ""),
                **({"measured": f"{v.get('date')} on {v.get('host')}"} if "host" in v else {}),
            }
            for key, v in profile["values"].items()
        ]
    )


def model_section(out: Path, sections: list[Section]) -> Section:
    """The "Model and limits" section for a report of ``sections`` built from ``out``."""
    simulated = [s.key for s in sections if s.kind == SIMULATED]
    used = distinct_profiles(out, simulated)
    if not used:  # nothing recorded one: show what a run would use now
        default = CostProfile.default().summary()
        used = [(default, [])]
    reading = []
    tables = []
    for profile, names in used:
        runs = f" (used by {', '.join(names)})" if names else " (the shipped default)"
        reading.append(
            f"Cost profile '{profile['name']}'{runs}: {len(profile['values'])} values, "
            f"{source_counts(profile)}. Each value's source is in the table below; 'assumed' "
            "values give the reason nothing better was found (docs/costs.md)."
        )
        tables.append((f"cost profile '{profile['name']}'", values_table(profile)))
    if len(used) > 1:
        reading.append("The experiments above ran with different profiles: compare with care.")
    reading.append(prefetcher_words())
    present = {s.key for s in sections}
    held = [text for key, texts in BY_CONSTRUCTION.items() if key in present for text in texts]
    return Section(
        key="model",
        title="Model and limits",
        question="What are the simulated numbers made of, and what do they not capture?",
        interpretation=reading,
        tables=tables,
        notes=[
            ("Simplifications of the model", SIMPLIFICATIONS),
            ("Results that hold by construction of the model (not findings)", held),
        ],
        provenance="The simulator's inputs and limits: every cost value and where it comes from.",
    )


def subtitle(sections: list[Section]) -> str:
    """The report title's second half: what kind of numbers the page holds."""
    parts = []
    profiles = {s.profile_name for s in sections if s.kind == SIMULATED and s.profile_name}
    if any(s.kind == SIMULATED for s in sections):
        named = ", ".join(f"'{p}'" for p in sorted(profiles)) or "not recorded"
        parts.append(f"simulated (cost profile {named})")
    flavours = {s.flavour for s in sections if s.kind == MEASURED and s.flavour}
    if any(s.kind == MEASURED for s in sections):
        parts.append(f"measured on KVM ({'; '.join(sorted(flavours)) or 'flavour unknown'})")
    if not parts:
        parts.append("architectural reference counts")
    return "second-level address translation: " + " and ".join(parts)
