"""The HTML report: self-contained, one section per result, readings computed from the tables."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pandas as pd
import pytest

from eptlab.cli import main
from eptlab.experiments import get, runner
from eptlab.experiments.registry import names
from eptlab.report import build_report, collect

SMALL_PREFETCH = {"accesses": "3000", "vcpus": "1,2", "remaps": "2", "seeds": "1",
                  "policies": "none,back,back+warm"}


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report")
    assert main(["demo", "--out", str(out), "--no-experiments", "--no-kvm"]) == 0
    runner.run("prefetch-hypercall", SMALL_PREFETCH, out / "prefetch-hypercall",
               show_progress=False)
    return out


def test_report_has_the_walk_tour_and_each_result(out: Path) -> None:
    page = build_report(out).read_text()
    assert [s.key for s in collect(out)] == ["walks", "prefetch-hypercall"]
    for key in ("walks", "prefetch-hypercall"):
        assert f'<section id="{key}">' in page
    assert get("prefetch-hypercall").question in page
    assert "cow-fork" not in page  # no results, no section


def test_report_is_self_contained(out: Path) -> None:
    page = build_report(out).read_text()
    assert "<script" not in page
    sources = re.findall(r'src="([^"]+)"', page)
    assert sources and all(s.startswith("data:image/png;base64,") for s in sources)
    links = re.findall(r'href="([^"]+)"', page)
    assert links and all(not x.startswith(("http:", "https:", "//")) for x in links)
    assert all((out / x).exists() for x in links if not x.startswith("#"))


def test_reading_is_computed_from_the_table(out: Path, tmp_path: Path) -> None:
    """The sentences quote the table's numbers, so a different run reads differently."""
    section = next(s for s in collect(out) if s.key == "prefetch-hypercall")
    table = pd.read_parquet(out / "prefetch-hypercall" / "prefetch-hypercall.parquet")
    one = table[(table.vcpus == 1)].set_index("policy")
    text = " ".join(section.interpretation)
    assert f"EPT violations from {int(one.loc['none', 'ept_violations']):,} to " in text
    assert f"to {int(one.loc['back', 'ept_violations']):,}," in text
    for vcpus in (1, 2):  # every vCPU count is read, each with the factor that gives the gain
        assert f"{vcpus} vCPU(s), which factor: " in text
    other = tmp_path / "other"
    runner.run("prefetch-hypercall", SMALL_PREFETCH | {"footprint_mib": "2"},
               other / "prefetch-hypercall", show_progress=False)
    again = collect(other)[0]
    assert again.interpretation != section.interpretation


def test_walk_reading_counts_the_events(out: Path) -> None:
    walks = next(s for s in collect(out) if s.key == "walks")
    situations = dict(walks.tables)["what the hypervisor sees"]
    exits = situations.outcome.str.startswith("exit").sum()
    assert f"{exits} end in a VM exit" in walks.interpretation[1]
    assert "makes 24 memory references" in walks.interpretation[0]


def test_every_experiment_has_a_demo_scale_and_a_reading() -> None:
    for name in names():
        experiment = get(name)
        params = experiment.Params()
        from eptlab.experiments.base import apply_overrides

        assert apply_overrides(type(params), dict(experiment.demo)) is not None
        assert callable(experiment.interpret)


def test_report_command(out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["report", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert main(["report", "--out", str(tmp_path / "empty")]) == 2
    assert "no results" in capsys.readouterr().err


@pytest.mark.browser
def test_report_screenshot_in_headless_chromium(out: Path, tmp_path: Path) -> None:
    from eptlab import browser

    why = browser.missing()
    if why is not None:
        print(f"browser test skipped: {why}")
        pytest.skip(why)
    png = tmp_path / "report.png"
    assert main(["report", "--out", str(out), "--screenshot", str(png), "--height", "700"]) == 0
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert (width, height) == (browser.WIDTH, 700)


@pytest.mark.kvm
def test_kvm_section_reads_the_kvm_results(tmp_path: Path) -> None:
    from eptlab.report.sections import kvm_section

    for name, overrides in (("kvm-crosscheck", {"pages": "16", "rounds": "1", "clones": "1",
                                                "tsx": "false"}),
                            ("kvm-dirty-log", {"pages": "32", "rounds": "1"})):
        runner.run(name, overrides, tmp_path / name, show_progress=False)
    section = kvm_section(tmp_path)
    assert section.figures == sorted(tmp_path.glob("kvm-*/*.png")) and len(section.figures) == 2
    cross = dict(section.tables)["eptlab run kvm-crosscheck"]
    assert f"{int(cross.equal.sum())} of {len(cross)} cross-checks agree" in " ".join(
        section.interpretation
    )
    module = cross.kvm_module.iloc[0]
    assert section.interpretation[1].startswith(f"Measured on {module}")
    assert "exactly the pages" in section.interpretation[2]
    assert "KVM itself took, per write: log" in section.interpretation[2]
    (collected,) = collect(tmp_path)
    assert collected.key == "kvm" and collected.kind == "measured"
    assert collected.flavour.startswith(f"{module}, ")
    page = build_report(tmp_path).read_text()
    assert '<section id="kvm">' in page and "measured on KVM (" in page.split("</h1>")[0]


@pytest.mark.kvm
def test_kvm_section_reads_results_of_several_seeds(tmp_path: Path) -> None:
    """The KVM experiments run several seeds (one row per method and seed): the section's
    readings take means, not one row (a Series in an f-string broke make demo)."""
    from eptlab.experiments.registry import get
    from eptlab.report.sections import kvm_section

    for name in ("kvm-prefetch", "kvm-fork"):
        runner.run(name, dict(get(name).demo), tmp_path / name, show_progress=False)
    reading = " ".join(kvm_section(tmp_path).interpretation)
    assert "cuts the guest's cycles per page" in reading and "means over 2 run(s)" in reading
    assert "Forking a 256 MiB guest" in reading


@pytest.mark.parametrize(
    ("tdp", "words"),
    [
        (True, "hardware EPT/NPT (TDP on)"),
        (False, "shadow paging"),
        (None, "unknown kind"),
    ],
)
def test_flavour_sentence_reads_tdp_from_a_table(tdp: bool | None, words: str) -> None:
    import pandas as pd

    from eptlab.report.sections import flavour_sentence

    table = pd.DataFrame([{"kvm_module": "kvm_intel", "tdp": tdp, "x": 1}] * 2)
    sentence = flavour_sentence(table)
    assert sentence.startswith("Measured on kvm_intel") and words in sentence


def test_broken_result_files_are_named_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kvm = tmp_path / "kvm-fork"
    kvm.mkdir()
    (kvm / "kvm-fork.json").write_text('{"command": "fork", "params": {}, "rows": [')
    assert main(["report", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{kvm / 'kvm-fork.json'}: not a readable results file" in err
    (kvm / "kvm-fork.json").write_text('{"command": "fork", "params": {}, "rows": []}')
    assert main(["report", "--out", str(tmp_path)]) == 1
    assert "no KVM application result has any row" in capsys.readouterr().err
    (kvm / "kvm-fork.json").unlink()
    broken = tmp_path / "prefetch-hypercall"
    broken.mkdir()
    (broken / "prefetch-hypercall.json").write_text('{"params": {"no_such": 1}}')
    (broken / "prefetch-hypercall.parquet").write_bytes(b"not parquet")
    assert main(["report", "--out", str(tmp_path)]) == 1
    assert "prefetch-hypercall.parquet: not a readable Parquet table" in capsys.readouterr().err


def test_demo_leaves_a_failing_experiment_out_and_still_writes_the_report(
    out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    from eptlab.experiments.prefetch_hypercall import PrefetchHypercall

    shutil.copytree(out / "prefetch-hypercall", tmp_path / "prefetch-hypercall")  # stale results
    monkeypatch.setattr(PrefetchHypercall, "demo", {"accesses": "many"})
    args = ["demo", "--out", str(tmp_path), "--only", "prefetch-hypercall", "--no-kvm"]
    assert main(args) == 1
    page = (tmp_path / "report.html").read_text()
    assert '<section id="walks">' in page and "prefetch-hypercall" not in page
    assert main(["demo", "--out", str(tmp_path), "--only", "no-such-thing"]) != 0


def test_every_section_says_where_its_numbers_come_from(out: Path) -> None:
    from eptlab.costs import CostProfile

    page = build_report(out).read_text()
    sections = {s.key: s for s in collect(out)}
    assert sections["walks"].kind == "architectural"
    simulated = sections["prefetch-hypercall"]
    assert simulated.kind == "simulated" and simulated.profile_name == "default"
    assert "cost profile 'default'" in simulated.provenance
    counts = CostProfile.default().sources()
    assert f"{counts['cited']} cited" in simulated.provenance
    assert "simulated (cost profile &#x27;default&#x27;)" in page.split("</h1>")[0]
    assert "measured</small>" not in page  # the old title claimed every number was measured


def test_model_and_limits_lists_every_profile_value_with_its_source(out: Path) -> None:
    from eptlab.costs import CostProfile

    page = build_report(out).read_text()
    model = html.unescape(page.split('<section id="model">')[1])
    assert "Model and limits" in model
    for key, value in CostProfile.default().values.items():
        assert f"<td>{key}</td>" in model
        assert value.source.ref[:60] in model
    assert "no memory-level parallelism" in model
    assert "by construction" in model


def test_a_run_with_another_profile_is_named_in_its_section(tmp_path: Path) -> None:
    from eptlab.costs import CostProfile, CostValue, Source, use_profile

    other = CostProfile.default().with_values(
        {"vmexit_cycles": CostValue(3000, "cycles", Source("measured", "test", "d", "h"))},
        name="host-x",
    )
    with use_profile(other):
        runner.run("prefetch-hypercall", SMALL_PREFETCH, tmp_path / "prefetch-hypercall",
                   show_progress=False)
    (section,) = collect(tmp_path)
    measured = other.sources()["measured"]
    assert measured == CostProfile.default().sources()["measured"] + 1
    assert section.profile_name == "host-x" and f"{measured} measured" in section.provenance
    model = build_report(tmp_path).read_text().split('<section id="model">')[1]
    assert "host-x" in model and "d on h" in model and "<td>measured</td>" in model
