"""The walk explorer: grid from the walker's references, cache-scenario rules (cross-checked
against the fast engine), the outcome bit by bit, the CLI, the server and the page itself in
headless Chromium."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hypothesis import given
from hypothesis import strategies as st

from eptlab import browser
from eptlab.arch import Access, PageSize
from eptlab.arch.exits import EPT_QUAL_MEANING, EptMisconfig, EptQual, EptViolation
from eptlab.arch.paging import PAGE_FAULT_MEANING, PageFaultError
from eptlab.cli import main
from eptlab.cli.walk import DEFAULT_GVA, run_walk, walk_space
from eptlab.errors import ConfigError
from eptlab.explore.model import (
    GROUPS,
    GUEST_COLUMN,
    BitRow,
    CacheOption,
    cache_options,
    cell_label,
    combine,
    ept_psc_hit,
    explorer_data,
    grid_of,
    guest_psc_hit,
    nested_tlb_hit,
    outcome_of,
    scenario_key,
    scenario_table,
    tlb_hit,
)
from eptlab.explore.page import render_page
from eptlab.explore.serve import make_server, serve_in_thread, url_of
from eptlab.mmu.config import Assoc, MmuConfig, TlbConfig
from eptlab.mmu.walker import DATA, Dim, Translation

if TYPE_CHECKING:
    from selenium.webdriver.chrome.webdriver import WebDriver

ROOT = Path(__file__).resolve().parents[2]
SIZES = [PageSize.SIZE_4K, PageSize.SIZE_2M, PageSize.SIZE_1G]
CONFIGS = [(n, m, g, e) for n in (4, 5) for m in (4, 5) for g in SIZES for e in SIZES]


def walk(
    n: int = 4,
    m: int = 4,
    g: PageSize = PageSize.SIZE_4K,
    e: PageSize = PageSize.SIZE_4K,
    *,
    access: Access = Access.READ,
    ept_perms: str = "rwx",
    table_perms: str = "rwx",
    user: bool = False,
    page_user: bool | None = None,
) -> Translation:
    """The guest page tables stay on 4 KiB EPT pages (``e`` backs only the data page) so the
    grid has the data row's absent slots; tests/mmu/test_walk_options.py covers uniform backing."""
    return run_walk(
        table_ept_page=PageSize.SIZE_4K,
        guest_levels=n,
        ept_levels=m,
        guest_page=g,
        ept_page=e,
        access=access,
        ept_perms=ept_perms,
        table_perms=table_perms,
        user=user,
        page_user=page_user,
    )


def expected_count(n: int, m: int, g: PageSize, e: PageSize) -> int:
    """Guest rows n..leaf, each an EPT walk of the table page (4 KiB EPT pages: m reads) plus
    the guest read; then the data page's EPT walk, which ends at the EPT leaf's level."""
    guest_rows = n - g.level + 1
    return guest_rows * (m + 1) + (m - e.level + 1)


# -- the grid ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "m", "g", "e"), CONFIGS)
def test_grid_has_one_cell_per_reference(n: int, m: int, g: PageSize, e: PageSize) -> None:
    t = walk(n, m, g, e)
    assert t.ok
    grid = grid_of(t)
    assert len(grid.cells) == t.count == expected_count(n, m, g, e)
    assert [r.for_level for r in grid.rows] == [*range(n, g.level - 1, -1), DATA]
    assert [c.level for c in grid.columns] == [*range(m, 0, -1), GUEST_COLUMN]
    positions = [(c.row, c.col) for c in grid.cells]
    assert len(set(positions)) == len(positions)
    assert positions == sorted(positions)  # walk order reads the grid row by row, left to right
    # every grid position is a cell or a slot; the data row's missing EPT levels are "absent"
    assert len(grid.cells) + len(grid.slots) == len(grid.rows) * len(grid.columns)
    kinds = [s.kind for s in grid.slots]
    assert kinds.count("data") == 1 and kinds.count("absent") == e.level - 1
    assert "unreached" not in kinds


def test_grid_sizes_of_the_issue() -> None:
    assert len(grid_of(walk(4, 4)).cells) == 24
    assert len(grid_of(walk(5, 5)).cells) == 35


def test_cell_labels_name_row_and_ept_level() -> None:
    t = walk()
    labels = [cell_label(r) for r in t.references]
    assert labels[:5] == ["gL4 / eL4", "gL4 / eL3", "gL4 / eL2", "gL4 / eL1", "gL4"]
    assert labels[-1] == "data / eL1"


# -- cache scenarios ----------------------------------------------------------------------------


def remaining(t: Translation, removed: frozenset[int]) -> list[int]:
    return [i for i in range(t.count) if i not in removed]


@pytest.mark.parametrize(("n", "m"), [(4, 4), (5, 4), (4, 5), (5, 5)])
def test_tlb_hit_removes_the_whole_walk(n: int, m: int) -> None:
    t = walk(n, m)
    assert remaining(t, tlb_hit(t.references)) == []


@given(
    st.sampled_from([4, 5]),
    st.sampled_from([4, 5]),
    st.sampled_from(SIZES),
    st.data(),
)
def test_guest_psc_walk_starts_below_the_cached_entry(
    n: int, m: int, e: PageSize, data: st.DataObject
) -> None:
    t = walk(n, m, PageSize.SIZE_4K, e)
    level = data.draw(st.integers(2, n), label="cached level")
    left = [t.references[i] for i in remaining(t, guest_psc_hit(t.references, level))]
    # the combined entry gives the HPA of the next table: the first read is its guest entry
    assert left[0].dim == Dim.GUEST and left[0].level == level - 1
    guest = [r.level for r in left if r.dim == Dim.GUEST]
    assert guest == list(range(level - 1, 0, -1))
    table_walks = [r for r in left if r.dim == Dim.EPT and r.for_level != DATA]
    assert len(table_walks) == (level - 2) * m
    assert len([r for r in left if r.for_level == DATA]) == m - e.level + 1


@pytest.mark.parametrize(("n", "m", "g", "e"), CONFIGS[::5])
def test_nested_tlb_removes_the_ept_walks_of_the_rows_it_holds(
    n: int, m: int, g: PageSize, e: PageSize
) -> None:
    t = walk(n, m, g, e)
    refs = t.references
    tables = {r.for_level for r in refs} - {DATA}
    left = [refs[i] for i in remaining(t, nested_tlb_hit(refs, tables))]
    assert all(r.dim == Dim.GUEST or r.for_level == DATA for r in left)
    assert len([r for r in left if r.dim == Dim.GUEST]) == len(tables)
    left = [refs[i] for i in remaining(t, nested_tlb_hit(refs, tables | {DATA}))]
    assert [r.dim for r in left] == [Dim.GUEST] * len(tables)


@given(st.sampled_from([4, 5]), st.sampled_from([4, 5]), st.sampled_from(SIZES), st.data())
def test_ept_psc_keeps_the_lower_reads_of_every_ept_walk(
    n: int, m: int, e: PageSize, data: st.DataObject
) -> None:
    t = walk(n, m, PageSize.SIZE_4K, e)
    level = data.draw(st.integers(2, m), label="cached EPT level")
    removed = ept_psc_hit(t.references, level)
    assert all(t.references[i].dim == Dim.EPT for i in removed)
    by_row: dict[int, list[int]] = {}
    for i in remaining(t, removed):
        r = t.references[i]
        if r.dim == Dim.EPT:
            by_row.setdefault(r.for_level, []).append(r.level)
    for row, levels in by_row.items():
        leaf = e.level if row == DATA else 1
        # a walk starts below the lowest cached entry, but never below the entry it must read
        assert levels == list(range(max(level - 1, leaf), leaf - 1, -1))
    assert len(by_row) == len({r.for_level for r in t.references})


def test_scenario_table_covers_every_combination_and_unions_the_rules() -> None:
    t = walk()
    options = cache_options(t)
    table = scenario_table(options)
    per_group = {g: 1 + sum(o.available and o.group == g for o in options) for g in GROUPS}
    expected = 1
    for count in per_group.values():
        expected *= count
    assert len(table) == expected
    assert table[scenario_key({})] == []
    assert table[scenario_key({"tlb": 1, "epsc": 2})] == list(range(t.count))
    refs = t.references
    both = guest_psc_hit(refs, 3) | ept_psc_hit(refs, 3)
    assert table[scenario_key({"psc": 3, "epsc": 3})] == sorted(both)
    assert combine(options, {"psc": 3, "epsc": 3}) == both


# The same rules, measured: the fast engine runs the translation twice with one structure on
# and counts the references of the second walk (SDM Vol. 3A §4.10, Vol. 3C §29.4).
OFF = Assoc(0, 1)
ONLY = {
    "tlb": TlbConfig(),
    "psc": TlbConfig(
        **{f: OFF for f in TlbConfig.__dataclass_fields__ if not f.startswith("psc_")}
    ),
    "ntlb": TlbConfig(
        **{f: OFF for f in TlbConfig.__dataclass_fields__ if not f.startswith("ntlb_")}
    ),
    "epsc": TlbConfig(
        **{f: OFF for f in TlbConfig.__dataclass_fields__ if not f.startswith("epsc_")}
    ),
    "psc+ntlb+epsc": TlbConfig(
        **{f: OFF for f in TlbConfig.__dataclass_fields__ if f[:2] in ("l1", "st")}
    ),
}


def second_walk_references(config: TlbConfig, n: int, m: int, g: PageSize, e: PageSize) -> int:
    from eptlab.mmu.engine import Engine

    space = walk_space(guest_levels=n, ept_levels=m, guest_page=g, ept_page=e)
    engine = Engine(space.memory, MmuConfig(tlb=config), space.features)
    engine.add_vcpu(space.guest, space.vmcs)
    assert engine.translate(DEFAULT_GVA, Access.READ).done
    engine.reset_stats()
    assert engine.translate(DEFAULT_GVA, Access.READ).done
    return engine.stats().walk_references


def lowest(options: list[CacheOption], group: str) -> int:
    return min(o.value for o in options if o.group == group and o.available)


@pytest.mark.parametrize("structures", list(ONLY))
@pytest.mark.parametrize(
    ("n", "m", "g", "e"),
    [
        (4, 4, PageSize.SIZE_4K, PageSize.SIZE_4K),
        (5, 5, PageSize.SIZE_4K, PageSize.SIZE_4K),
        (4, 5, PageSize.SIZE_2M, PageSize.SIZE_4K),
        (5, 4, PageSize.SIZE_4K, PageSize.SIZE_2M),
    ],
)
def test_scenarios_match_the_fast_engine(
    structures: str, n: int, m: int, g: PageSize, e: PageSize
) -> None:
    t = walk(n, m, g, e)
    options = cache_options(t)
    # after one walk every structure holds what it cached: the lowest levels win
    choice = {
        "tlb": {"tlb": 1},
        "psc": {"psc": lowest(options, "psc")},
        "ntlb": {"ntlb_tables": 1, "ntlb_data": 1},
        "epsc": {"epsc": lowest(options, "epsc")},
        "psc+ntlb+epsc": {
            "psc": lowest(options, "psc"),
            "ntlb_tables": 1,
            "ntlb_data": 1,
            "epsc": lowest(options, "epsc"),
        },
    }[structures]
    predicted = t.count - len(combine(options, choice))
    assert second_walk_references(ONLY[structures], n, m, g, e) == predicted


# -- the outcome ----------------------------------------------------------------------------------


def bits_value(rows: list[BitRow]) -> int:
    return sum(r.value << r.bit for r in rows)


def test_ept_violation_on_the_data_page_bit_by_bit() -> None:
    t = walk(access=Access.WRITE, ept_perms="r-x")
    assert isinstance(t.exit, EptViolation)
    out = outcome_of(t)
    assert out.kind == "ept_violation" and out.at == t.count - 1
    stop = t.references[out.at]
    assert stop.dim == Dim.EPT and stop.for_level == DATA and stop.level == 1
    assert [b.name for b in out.bits] == [f.name for f in EptQual]
    assert [b.bit for b in out.bits] == [int(f).bit_length() - 1 for f in EptQual]
    assert bits_value(out.bits) == t.exit.qualification
    named = {b.name: b.value for b in out.bits}
    assert named["WRITE"] == 1 and named["READABLE"] == 1 and named["WRITABLE"] == 0
    assert named["GLA_TRANSLATION"] == 1
    options = {(o.group, o.value): o for o in cache_options(t)}
    assert not options[("tlb", 1)].available
    assert not options[("ntlb_data", 1)].available  # it would skip the violating walk
    assert options[("ntlb_tables", 1)].available


def test_not_present_table_page_stops_the_first_ept_walk() -> None:
    t = walk(table_perms="---")
    assert isinstance(t.exit, EptViolation)
    out = outcome_of(t)
    grid = grid_of(t)
    assert out.at == t.count - 1 == 3  # the EPT PTE mapping the guest PML4 table's page
    assert len(grid.rows) == 1 and [s.kind for s in grid.slots] == ["unreached"]
    named = {b.name: b.value for b in out.bits}
    assert named["GLA_TRANSLATION"] == 0 and named["READABLE"] == 0


def test_misconfiguration_names_the_entry_and_the_rule() -> None:
    t = walk(ept_perms="-w-")
    assert isinstance(t.exit, EptMisconfig)
    out = outcome_of(t)
    assert out.kind == "ept_misconfig" and out.at == t.count - 1
    assert t.references[out.at].value & 0b11 == 0b10  # write without read
    assert out.bits == []
    assert ("rule broken", t.exit.why) in out.details


def test_accessed_flag_write_violation_points_at_the_guest_entry() -> None:
    t = walk(table_perms="r-x")  # the guest A-flag updates need EPT write (SDM §29.3.3.2)
    assert isinstance(t.exit, EptViolation)
    out = outcome_of(t)
    assert out.at is not None
    stop = t.references[out.at]
    assert stop.dim == Dim.GUEST and stop.gpa == t.exit.gpa
    assert "accessed/dirty" in out.note


def test_guest_page_fault_error_code_bit_by_bit() -> None:
    t = walk(user=True, page_user=False)
    assert t.fault is not None and t.exit is None
    out = outcome_of(t)
    assert out.kind == "guest_fault" and out.at == t.count - 1
    assert [b.name for b in out.bits] == [f.name for f in PageFaultError]
    assert bits_value(out.bits) == t.fault.error_code
    named = {b.name: b.value for b in out.bits}
    assert named["P"] == 1 and named["US"] == 1 and named["WR"] == 0


def test_every_bit_has_its_meaning() -> None:
    assert set(EPT_QUAL_MEANING) == set(EptQual)
    assert set(PAGE_FAULT_MEANING) == set(PageFaultError)
    rows = outcome_of(walk(access=Access.WRITE, ept_perms="r-x")).bits
    assert all(r.meaning == EPT_QUAL_MEANING[EptQual(1 << r.bit)] for r in rows)


def test_initial_state_is_checked() -> None:
    t = walk()
    with pytest.raises(ConfigError):
        explorer_data(t, command="x", initial_step=25)
    # with the PDE cached 5 references remain: step 6 does not exist
    assert explorer_data(t, command="x", initial_step=5, initial_choice={"psc": 2})
    with pytest.raises(ConfigError):
        explorer_data(t, command="x", initial_step=6, initial_choice={"psc": 2})
    with pytest.raises(ConfigError, match="not offered"):
        explorer_data(t, command="x", initial_choice={"psc": 1})  # a PTE maps, it is no table
    with pytest.raises(ConfigError, match="unknown group"):
        explorer_data(t, command="x", initial_choice={"l2": 1})
    stopped = walk(access=Access.WRITE, ept_perms="r-x")
    with pytest.raises(ConfigError, match="not available"):
        explorer_data(stopped, command="x", initial_choice={"tlb": 1})


# -- page, CLI, server ---------------------------------------------------------------------------


def embedded(page: str) -> dict[str, object]:
    match = re.search(r'<script type="application/json" id="walk-data">(.*?)</script>', page)
    assert match is not None
    data: dict[str, object] = json.loads(match.group(1))
    return data


def test_page_is_self_contained_and_embeds_the_model() -> None:
    t = walk(access=Access.WRITE, ept_perms="r-x")
    data = explorer_data(t, command="eptlab explore </script>")
    page = render_page(data)
    assert embedded(page) == json.loads(json.dumps(data))
    assert page.count("</script>") == 2  # the data cannot close its element early
    assert not re.search(r"""(src|href)=["']?https?:""", page)  # nothing from the network


def test_cli_writes_the_page(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "e.html"
    args = ["explore", "--guest-levels", "5", "--ept-levels", "5", "--out", str(out)]
    assert main([*args, "--ept-perms", "r-x", "--access", "write"]) == 0
    assert "35 references" in capsys.readouterr().out
    data = embedded(out.read_text())
    assert len(data["cells"]) == 35  # type: ignore[arg-type]
    assert data["command"] == (
        "eptlab explore --guest-levels 5 --ept-levels 5 --access write --ept-perms r-x"
    )
    assert main(["explore", "--out", str(out), "--step", "99"]) == 1
    assert main(["explore", "--out", str(out), "--ept-perms", "rwz"]) == 2
    assert main(["explore", "--out", str(out), "--cache", "psc=pde", "--cache", "ntlb-data"]) == 0
    data = embedded(out.read_text())
    assert data["initial_choice"] == {
        "tlb": 0,
        "psc": 2,
        "ntlb_tables": 0,
        "ntlb_data": 1,
        "epsc": 0,
    }
    assert main(["explore", "--out", str(out), "--cache", "psc=pte"]) == 1
    assert main(["explore", "--out", str(out), "--cache", "psc=big"]) == 2


def test_server_serves_the_page_on_loopback(tmp_path: Path) -> None:
    page = tmp_path / "explorer.html"
    page.write_text(render_page(explorer_data(walk(), command="eptlab explore")))
    server = make_server(page, 0)
    assert server.server_address[0] == "127.0.0.1"
    (tmp_path / "secret.csv").write_text("results")
    thread = serve_in_thread(server)
    base = f"http://127.0.0.1:{server.server_address[1]}"
    refused = []
    try:
        with urllib.request.urlopen(url_of(server, page), timeout=10) as response:
            body = response.read().decode()
        with urllib.request.urlopen(base + "/", timeout=10) as response:
            assert response.read().decode() == body
        for path in ("/secret.csv", "/../etc/passwd", "/explorer.html/..", "/?x=/secret.csv/"):
            try:
                urllib.request.urlopen(base + path, timeout=10)
            except urllib.error.HTTPError as err:
                refused.append(err.code)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
    assert len(embedded(body)["cells"]) == 24  # type: ignore[arg-type]
    assert refused == [404, 404, 404]  # the query string does not change the path: "/" served


def test_addresses_outside_64_bits_are_refused(tmp_path: Path) -> None:
    out = tmp_path / "e.html"
    assert main(["explore", "--out", str(out), "--gva", "-1"]) == 2
    assert main(["walk", "--gva", hex(1 << 64)]) == 2
    assert main(["explore", "--out", str(out), "--gva", "0xffffffffffffffff"]) == 0


def test_cli_serve_prints_the_url_and_serves(tmp_path: Path) -> None:
    out = tmp_path / "served.html"
    cmd = [sys.executable, "-m", "eptlab.cli", "explore", "--serve", "--port", "0"]
    proc = subprocess.Popen(
        [*cmd, "--out", str(out)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
    )
    try:
        assert proc.stdout is not None
        url = ""
        for line in proc.stdout:
            if line.startswith("serving "):
                url = line.split()[1]
                break
        assert url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(url, timeout=10) as response:
            assert "walk-data" in response.read().decode()
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stdout is not None:
            proc.stdout.close()


# -- the page in headless Chromium -------------------------------------------------------------


@pytest.fixture(scope="module")
def driver() -> Iterator[WebDriver]:
    why = browser.missing()
    if why is not None:
        print(f"browser test skipped: {why}")
        pytest.skip(why)
    d = browser.start()
    yield d
    d.quit()


def write_page(path: Path, t: Translation) -> Path:
    path.write_text(render_page(explorer_data(t, command="eptlab explore")))
    return path


def state(d: WebDriver) -> dict[str, object]:
    script = """
      const idx = (sel) => [...document.querySelectorAll(sel)].map((e) => +e.dataset.index);
      return {cells: idx(".cell"), current: idx(".cell.current"), done: idx(".cell.done"),
              removed: idx(".cell.removed"), exit: idx(".cell.exit"),
              rowCurrent: idx("tr.ref.current"), step: +document.body.dataset.step,
              removedCount: +document.querySelector("#removed-count").dataset.count,
              currentLabel: (document.querySelector(".cell.current .lbl") || {}).textContent,
              setBits: document.querySelectorAll("#bits tr.set").length};
    """
    result: dict[str, object] = d.execute_script(script)
    return result


@pytest.mark.browser
def test_page_steps_through_the_walk_in_chromium(driver: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    t = walk()
    driver.get(write_page(tmp_path / "w.html", t).as_uri())
    s = state(driver)
    assert len(s["cells"]) == 24 and s["current"] == [] and s["step"] == 0  # type: ignore[arg-type]
    nxt = driver.find_element(By.ID, "next")
    for k in range(1, 8):
        nxt.click()
        s = state(driver)
        assert s["current"] == [k - 1] and s["rowCurrent"] == [k - 1]
        assert s["done"] == list(range(k - 1))
        assert s["currentLabel"] == cell_label(t.references[k - 1])
    driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ARROW_RIGHT)
    assert state(driver)["current"] == [7]
    driver.find_element(By.ID, "prev").click()
    assert state(driver)["current"] == [6]

    # the guest paging-structure caches hold the PDE: its rows and walks are greyed
    driver.find_element(By.ID, "reset").click()
    driver.find_element(By.ID, "opt-psc-2").click()
    removed = guest_psc_hit(t.references, 2)
    s = state(driver)
    assert s["removed"] == sorted(removed) and s["removedCount"] == len(removed)
    nxt.click()
    assert state(driver)["current"] == [min(set(range(t.count)) - removed)]  # the guest PTE
    driver.find_element(By.ID, "opt-tlb-1").click()
    assert state(driver)["removedCount"] == 24

    driver.find_element(By.ID, "opt-tlb-1").click()
    driver.find_element(By.ID, "opt-psc-0").click()
    driver.find_element(By.ID, "reset").click()
    for _ in range(9):
        nxt.click()
    png = ROOT / "out" / "explorer.png"
    png.parent.mkdir(exist_ok=True)
    browser.fit_height(driver)
    assert driver.save_screenshot(str(png)) and png.stat().st_size > 10_000


@pytest.mark.browser
def test_page_shows_where_the_walk_stops(driver: WebDriver, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    t = walk(access=Access.WRITE, ept_perms="r-x")
    assert isinstance(t.exit, EptViolation)
    driver.get(write_page(tmp_path / "x.html", t).as_uri())
    nxt = driver.find_element(By.ID, "next")
    assert state(driver)["exit"] == []
    while nxt.is_enabled():
        nxt.click()
    s = state(driver)
    assert s["exit"] == [t.count - 1] and s["current"] == [t.count - 1]
    assert s["setBits"] == bin(t.exit.qualification).count("1")
    assert driver.find_element(By.ID, "opt-tlb-1").get_attribute("disabled") is not None

    # the accessed-flag write fails after the last read: the exit shows at the end, on the entry
    t = walk(table_perms="r-x")
    at = outcome_of(t).at
    assert at is not None and at < t.count - 1
    driver.get(write_page(tmp_path / "ad.html", t).as_uri())
    nxt = driver.find_element(By.ID, "next")
    for _ in range(at + 1):
        nxt.click()
    assert state(driver)["exit"] == []
    while nxt.is_enabled():
        nxt.click()
    assert state(driver)["exit"] == [at]


@pytest.mark.browser
def test_page_opens_with_the_chosen_scenario(driver: WebDriver, tmp_path: Path) -> None:
    t = walk(5, 5)
    page = tmp_path / "c.html"
    choice = {"psc": 3, "epsc": 3}
    data = explorer_data(t, command="x", initial_step=2, initial_choice=choice)
    page.write_text(render_page(data))
    driver.get(page.as_uri())
    removed = guest_psc_hit(t.references, 3) | ept_psc_hit(t.references, 3)
    s = state(driver)
    assert len(s["cells"]) == 35  # type: ignore[arg-type]
    assert s["removed"] == sorted(removed) and s["step"] == 2
    assert s["current"] == [sorted(set(range(35)) - removed)[1]]
