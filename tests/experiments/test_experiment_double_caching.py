"""The double-caching experiment shows its claims on a small run, and `eptlab run` writes its
files: the virtio-blk rows (one init_on_alloc and readahead value), then every path and axis."""

from __future__ import annotations

import dataclasses

import pandas as pd
import pytest

from eptlab.experiments import runner

FILE_MIB = 2
PAGES_PER_MIB = 256


@pytest.fixture(scope="module")
def table(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("double-caching")
    result = runner.run(
        "double-caching",
        {
            "files": "2",
            "file_mib": str(FILE_MIB),
            "guest_mib": "96",
            "host_cache_mib": "8",
            "disks": "nvme,hdd",
            "paths": "virtio-blk",
            "init_on_alloc": "1",
            "host_readahead_kib": "0",
            "seeds": "1",
        },
        out,
        show_progress=False,
    )
    for suffix in (".csv", ".parquet", ".json", ".jsonl"):
        assert (out / f"double-caching{suffix}").exists()
    assert (out / "double-caching.png").stat().st_size > 1000
    return result.table


def one(t: pd.DataFrame, host: str, guest: str, disk: str = "nvme") -> pd.Series:
    sel = t[(t.host_cache == host) & (t.guest_cache == guest) & (t.disk == disk)]
    assert len(sel) == 1
    return sel.iloc[0]


def test_columns(table: pd.DataFrame) -> None:
    required = {
        "host_cache", "guest_cache", "file_mib", "ept_violations", "ept_violations_per_mib",
        "disk_reads", "io_ms", "duplicated_mib",
    }
    assert required <= set(table.columns)
    assert len(table) == 2 * 3 * 4


def test_ept_rate_follows_new_guest_pages_not_the_data_source(table: pd.DataFrame) -> None:
    cold = table[table.guest_cache == "cold"]
    assert cold.ept_violations_per_mib.nunique() == 1  # host cold, warm, direct; every disk
    assert (cold.ept_violations == cold.guest_pages_allocated).all()
    assert (cold.guest_pages_allocated == FILE_MIB * PAGES_PER_MIB).all()
    # ... while the data came from the disk, from the host cache, or straight from the disk
    assert cold.disk_reads.nunique() > 1 and cold.io_ms.nunique() > 1
    warm = table[table.guest_cache == "warm"]
    assert (warm.ept_violations == 0).all() and (warm.guest_pages_allocated == 0).all()
    assert (warm.disk_reads == 0).all() and (warm.virtio_requests == 0).all()


def test_reused_guest_pages_do_not_fault_unless_given_back(table: pd.DataFrame) -> None:
    dropped = table[table.guest_cache == "dropped"]
    assert (dropped.guest_pages_allocated == FILE_MIB * PAGES_PER_MIB).all()
    assert (dropped.ept_violations == 0).all()  # recycled guest pages: still backed
    reported = table[table.guest_cache == "dropped-reported"]
    assert (reported.ept_violations > 0).all()
    # exactly the pages whose frames the host took back fault again
    stale_pages = (reported.stale_mib_before * PAGES_PER_MIB).round().astype(int)
    assert (reported.ept_violations == reported.guest_pages_allocated - stale_pages).all()


def test_disk_reads_follow_the_host_cache(table: pd.DataFrame) -> None:
    for disk in ("nvme", "hdd"):
        cold, warm, direct = (one(table, h, "cold", disk) for h in ("cold", "warm", "direct"))
        assert cold.disk_reads > 0 and warm.disk_reads == 0 and direct.disk_reads > 0
        assert cold.disk_reads == direct.disk_reads and cold.disk_mib == FILE_MIB
        assert warm.host_cache_hits == FILE_MIB * PAGES_PER_MIB
        assert warm.io_ms < cold.io_ms and warm.io_ms < direct.io_ms
    assert one(table, "cold", "cold", "hdd").io_ms > one(table, "cold", "cold", "nvme").io_ms
    # the EPT work does not depend on the disk
    assert one(table, "cold", "cold", "hdd").ept_ms == one(table, "warm", "cold", "nvme").ept_ms


def test_duplicated_bytes(table: pd.DataFrame) -> None:
    for host in ("cold", "warm"):
        assert one(table, host, "cold").duplicated_mib == FILE_MIB
    assert (table[table.host_cache == "direct"].duplicated_mib == 0).all()
    assert one(table, "warm", "warm").duplicated_mib_before == FILE_MIB
    assert one(table, "cold", "warm").duplicated_mib == 0  # the host dropped its cache
    # double caching costs host RAM: the same read with the host cache holds twice the data
    assert one(table, "warm", "cold").host_mib - one(table, "direct", "cold").host_mib == (
        pytest.approx(FILE_MIB, abs=0.1)
    )


def test_dropping_the_guest_cache(table: pd.DataFrame) -> None:
    for host in ("cold", "warm", "direct"):
        r = one(table, host, "dropped")
        assert r.duplicated_mib_before == 0
        assert r.stale_mib_before == FILE_MIB  # freed guest pages keep their host frames
        assert r.stale_mib == 0  # the re-read reused them
        reported = one(table, host, "dropped-reported")
        assert reported.stale_mib_before < FILE_MIB
    warm = one(table, "warm", "dropped")
    assert warm.disk_reads == 0 and warm.host_cache_hits == FILE_MIB * PAGES_PER_MIB
    assert warm.duplicated_mib == FILE_MIB  # and the re-read doubles it again
    assert one(table, "direct", "dropped").disk_reads > 0  # nothing to fall back on


def test_reading_quotes_the_table(table: pd.DataFrame) -> None:
    from eptlab.experiments.double_caching import DoubleCaching, DoubleCachingParams

    params = DoubleCachingParams(files=2, file_mib=FILE_MIB, guest_mib=96, host_cache_mib=8)
    params = dataclasses.replace(
        params, paths=("virtio-blk",), init_on_alloc=(1,), host_readahead_kib=(0,)
    )
    lines = DoubleCaching().interpret(table, params)
    assert len(lines) == 3
    pages = FILE_MIB * PAGES_PER_MIB
    assert f"{pages:,} new page-cache pages, the same whatever" in lines[0]
    reported = one(table, "warm", "dropped-reported").ept_violations
    assert f"it took {reported:,} for the {reported:,} pages" in lines[1]
    assert f"{FILE_MIB:.1f} of the {FILE_MIB} MiB read" in lines[2]


# -- the paths: virtio-blk against a DAX window, init_on_alloc, host readahead ---------------------

AHEAD_KIB = 128


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("double-caching-paths")
    result = runner.run(
        "double-caching",
        {
            "files": "2", "file_mib": str(FILE_MIB), "guest_mib": "96", "host_cache_mib": "8",
            "disks": "nvme", "guest_caches": "cold,warm", "seeds": "1",
            "host_readahead_kib": f"0,{AHEAD_KIB}",
        },
        out,
        show_progress=False,
    )
    assert (out / "double-caching-paths.png").stat().st_size > 1000
    return result.table


def row(t: pd.DataFrame, **where: object) -> pd.Series:
    base = {"guest_cache": "cold", "init_on_alloc": 1, "host_readahead_kib": 0}
    sel = t
    for key, value in (base | where).items():
        sel = sel[sel[key] == value]
    assert len(sel) == 1, where
    return sel.iloc[0]


def test_an_axis_that_cannot_change_a_row_runs_once(paths: pd.DataFrame) -> None:
    dax = paths[paths.path == "dax"]
    assert set(dax.host_cache) == {"cold", "warm"} and set(dax.init_on_alloc) == {1}
    assert set(paths[paths.host_cache != "cold"].host_readahead_kib) == {0}
    # virtio: cold 2 guests x 2 inits x 2 readaheads, warm and direct 2 x 2; dax: 2 x 2 + 2
    assert len(paths) == 8 + 4 + 4 + 4 + 2


def test_dax_violations_count_pages_and_the_host_cache_prices_them(paths: pd.DataFrame) -> None:
    pages = FILE_MIB * PAGES_PER_MIB
    cold, warm = (row(paths, path="dax", host_cache=h) for h in ("cold", "warm"))
    for r in (cold, warm):
        assert r.ept_violations == r.window_violations == r.window_pages == pages
        assert r.guest_pages_allocated == 0 and r.guest_cache_mib == 0 and r.virtio_exits == 0
        assert r.duplicated_mib == 0 and r.window_mib == FILE_MIB  # one copy: the host's
        assert r.cpu_copies == pages and r.host_copies == 0
    assert cold.disk_reads == pages and warm.disk_reads == 0
    assert cold.ept_ms + cold.io_ms > warm.ept_ms + warm.io_ms
    # virtio-blk: the violations do not see the host cache; its host RAM holds the data twice
    v_cold, v_warm = (row(paths, path="virtio-blk", host_cache=h) for h in ("cold", "warm"))
    assert v_cold.ept_violations == v_warm.ept_violations == v_cold.guest_pages_allocated
    assert v_warm.duplicated_mib == FILE_MIB and v_warm.cpu_copies == 2 * pages
    assert v_warm.host_mib - warm.host_mib == pytest.approx(FILE_MIB, abs=0.2)
    assert row(paths, path="dax", host_cache="cold", guest_cache="warm").ept_violations == 0


def test_init_on_alloc_0_keeps_the_count_and_moves_the_cost(paths: pd.DataFrame) -> None:
    for host in ("cold", "warm", "direct"):
        on = row(paths, path="virtio-blk", host_cache=host)
        off = row(paths, path="virtio-blk", host_cache=host, init_on_alloc=0)
        assert off.ept_violations == on.ept_violations == off.mapped_existing
        assert off.device_first_touches == off.guest_pages_allocated and on.mapped_existing == 0
        assert off.ept_ms < on.ept_ms and off.guest_ms < on.guest_ms and off.io_ms > on.io_ms


def test_readahead_cuts_disk_reads_not_violations(paths: pd.DataFrame) -> None:
    for path in ("virtio-blk", "dax"):
        without = row(paths, path=path, host_cache="cold")
        ahead = row(paths, path=path, host_cache="cold", host_readahead_kib=AHEAD_KIB)
        assert ahead.disk_reads < without.disk_reads and ahead.readahead_mib > 0
        assert ahead.ept_violations == without.ept_violations


def test_readings_of_the_new_rows_quote_the_table(paths: pd.DataFrame) -> None:
    from eptlab.experiments.double_caching import DoubleCaching, DoubleCachingParams

    params = DoubleCachingParams(
        files=2, file_mib=FILE_MIB, guest_mib=96, host_cache_mib=8, disks=("nvme",),
        guest_caches=("cold", "warm"), host_readahead_kib=(0, AHEAD_KIB),
    )
    lines = DoubleCaching().interpret(paths, params)
    pages = FILE_MIB * PAGES_PER_MIB
    dax = next(line for line in lines if line.startswith("On the DAX path"))
    assert f"{pages:,} EPT violations on the window with the host cache cold" in dax
    assert f"({pages:,} disk reads)" in dax and "(0 disk reads)" in dax
    init = next(line for line in lines if line.startswith("With init_on_alloc=0"))
    assert f"first touch of {pages:,} new pages" in init
    ahead = next(line for line in lines if line.startswith("Host readahead"))
    cold = row(paths, path="dax", host_cache="cold")
    fewer = row(paths, path="dax", host_cache="cold", host_readahead_kib=AHEAD_KIB)
    assert f"dax: disk reads from {cold.disk_reads:,} to {fewer.disk_reads:,}" in ahead
