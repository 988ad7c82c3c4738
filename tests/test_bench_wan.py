"""The pure parts of ``bench/wan.py``: the bounds it divides by and the counts it parses."""

from __future__ import annotations

import itertools

import pytest

from bench.wan import (
    NOT_PRESENT,
    SCENARIOS,
    Options,
    Scenario,
    ToolRun,
    main,
    parse_scenario,
    seeder_span,
    summarize,
    targets,
)
from bench.wan_plot import _rates
from cascade.errors import UsageError

pytestmark = pytest.mark.unit

MiB = 1 << 20


@pytest.mark.parametrize(
    ("name", "t_min", "http"),
    [
        ("8x40", 13.42, 107.37),  # the issue's table: 13.4 s
        ("16x40", 13.42, 214.75),
        ("8x100", 13.42, 107.37),
        ("4x10+4x40", 17.90, 107.37),  # 8 x F over 40 + 4 x 10 + 4 x 40 = 240 Mbit/s: 17.9 s
    ],
)
def test_bounds_match_the_issue(name: str, t_min: float, http: float) -> None:
    sc = SCENARIOS[name]
    assert round(sc.t_min(64 * MiB), 2) == t_min
    assert round(sc.http_bound(64 * MiB), 2) == http


@pytest.mark.parametrize(
    ("size", "given", "blocks"),
    [
        (64 * MiB, (), (128 << 10, 256 << 10)),  # cascade create's default for the file, and 256 KiB
        (256 * MiB, (), (256 << 10,)),  # the same size once
        (64 * MiB, (MiB,), (MiB,)),  # --block-size says
    ],
)
def test_cascade_runs_in_the_default_block_size_for_the_file_and_256k(
    size: int, given: tuple[int, ...], blocks: tuple[int, ...]
) -> None:
    assert Options(size=size, block_sizes=given).cascade_blocks() == blocks


def test_a_slow_seeder_alone_is_the_bound() -> None:
    # One fetcher: the seeder must send the whole file, whatever the fetcher could upload.
    assert Scenario("x", "", 10, (1000,)).t_min(10**6) == pytest.approx(0.8)


def test_not_present_lines_are_parsed_from_the_fetch_log() -> None:
    log = (
        "peer listening on 10.77.0.2:6666\n"
        "  10.77.0.1:6666: 35 blocks, 0 not present\n"
        "  10.77.0.6:6666: 28 blocks, 1572 not present\n"
        "peer fetch: x.bin complete: 64.0 MiB in 19.63 s\n"
    )
    assert NOT_PRESENT.findall(log) == [("35", "0"), ("28", "1572")]


def test_summary_medians_ratios_and_targets() -> None:
    sc = Scenario("s", "t", 40, (40, 40))
    size = 5 * MiB  # T_min = max(1.05, 2 x 41.9 / 120 Mbit/s = 0.70) = 1.05 s
    casc = ToolRun("cascade-256K", 2.1, [2.0, 2.1], {"seed": size * 2, "f0": size, "f1": 0}, 3.0, 40, 40)
    lt = ToolRun("libtorrent", 4.2, [4.0, 4.2], {"seed": size, "f0": 0, "f1": size}, 2.0)
    failed = ToolRun("cascade-256K", None, [None, 1.0], {}, 1.0, error="timeout")
    rows = summarize(sc, size, ["cascade-256K", "libtorrent"], [[casc, lt], [failed, lt]])
    c, t = rows
    assert c["seconds"] == 2.1 and c["runs_s"] == [2.1, None] and c["errors"] == ["timeout"]
    assert c["x_T_min"] == 2.003 and c["seeder_copies"] == 2.0 and c["status2_per_block"] == 1.0
    assert c["vs_libtorrent"] == 0.5 and t["status2_per_block"] == "n/a"
    assert {name: ok for name, ok, _ in targets(c)} == {
        "<= 1.15 x T_min": False,
        "seeder <= 1.10 copies": False,
        "<= 0.70 x libtorrent": True,
        "<= 1 status-2 reply per block": True,
    }
    assert targets(t) == []


def _seeding_run(seconds: float, rate: float, sends: tuple[float, float], step: float = 0.1) -> ToolRun:
    """A run whose seeder sent at ``rate`` bytes/s from ``sends[0]`` to ``sends[1]`` s, sampled every ``step`` s."""
    t0, base = 1000.0, 7_000_000  # the class counter holds what earlier runs sent
    run = ToolRun("cascade-128K", seconds, [seconds], {"seed": int(rate * (sends[1] - sends[0]))}, t0=t0)
    run.hosts = ["seed", "f0"]
    for j in range(-1, int((seconds + 0.5) / step)):
        t = j * step
        sent = rate * min(max(t - sends[0], 0.0), sends[1] - sends[0])
        run.samples.append((t0 + t, [base + round(sent), 0]))
    return run


def test_the_seeder_start_and_tail_are_read_from_its_counter_between_samples() -> None:
    # 10 MB at 5 MB/s from 0.5 s to 2.5 s; the last fetcher done at 3.0 s.
    run = _seeding_run(3.0, 5e6, (0.5, 2.5))
    start, end = seeder_span(run) or (0.0, 0.0)
    assert start == pytest.approx(0.52) and end == pytest.approx(2.48)
    sc = Scenario("s", "t", 40, (40,))
    (row,) = summarize(sc, 10 * MiB, ["cascade-128K"], [[run]])
    assert row["seeder_start_s"] == 0.52 and row["tail_s"] == 0.52


def test_no_start_or_tail_without_samples_that_reach_the_end() -> None:
    run = _seeding_run(3.0, 5e6, (0.5, 2.5))
    cut = ToolRun(run.tool, run.seconds, run.finish, run.sent, t0=run.t0, hosts=run.hosts, samples=run.samples[:20])
    assert seeder_span(cut) is None  # the samples stop at 1.8 s, before 99 % had left
    assert seeder_span(ToolRun("libtorrent", 3.0, [3.0], {"seed": 10}, t0=run.t0)) is None
    (row,) = summarize(Scenario("s", "t", 40, (40,)), 10 * MiB, ["cascade-128K"], [[cut]])
    assert row["seeder_start_s"] is None and row["tail_s"] is None


def test_the_picture_averages_each_upload_over_windows_of_half_a_second() -> None:
    ts, rates = _rates(_seeding_run(3.0, 5e6, (-1.0, 5.0)), 0)  # 40 Mbit/s from before the first sample on
    assert len(rates) >= 6 and rates == pytest.approx([40.0] * len(rates))  # 3.5 s of samples
    assert all(later - earlier >= 0.5 - 1e-9 for earlier, later in itertools.pairwise(ts))


def test_a_time_just_over_the_bound_misses_it_whatever_the_rounding() -> None:
    """15.455 s against T_min 13.422 s is 1.1515 x: two decimals said 1.15, and the target passed."""
    row = {"tool": "cascade-256K", "seconds": 15.455, "T_min_s": 13.422, "x_T_min": 1.151}
    row |= {"seeder_copies": 1.05, "vs_libtorrent": None, "status2_per_block": 0.0}
    assert dict((name, ok) for name, ok, _ in targets(row))["<= 1.15 x T_min"] is False
    row["seconds"] = 15.435  # 1.14998 x
    assert dict((name, ok) for name, ok, _ in targets(row))["<= 1.15 x T_min"] is True


def test_a_written_scenario_gives_rates_late_joiners_and_a_file_name() -> None:
    sc = parse_scenario("40/7x40+1x10@8")
    assert sc.seeder_mbit == 40
    assert sc.fetcher_mbit == (40.0,) * 7 + (10.0,)
    assert [sc.delay(i) for i in range(sc.n)] == [0.0] * 7 + [8.0]
    assert "/" not in sc.slug
    assert parse_scenario("8x40") is SCENARIOS["8x40"]
    assert parse_scenario("100/8x10").t_min(64 * MiB) == pytest.approx(8 * 64 * MiB * 8 / 180e6)


@pytest.mark.parametrize("text", ["x", "40/", "40/8x", "40/0x10", "0/1x10", "40/65x10", "40/8x10@", "-1/8x10"])
def test_a_malformed_scenario_is_one_usage_error(text: str) -> None:
    with pytest.raises(UsageError, match="--scenario"):
        parse_scenario(text)


@pytest.mark.parametrize("fraction", ["0", "1.5", "-0.5"])
def test_a_fetcher_upload_fraction_outside_0_1_is_one_usage_line(
    fraction: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["--fetcher-upload", fraction, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bench.wan: --fetcher-upload must be in (0, 1], not {float(fraction):g}"]


@pytest.mark.parametrize(
    ("sizes", "message"),
    [("256K,0", "invalid block size '0': it must be at least 1 byte"), ("2G", "invalid block size '2G': the largest")],
)
def test_a_block_size_cascade_create_refuses_is_one_usage_line(
    sizes: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Checked before anything is built (cascade create's own limits), not after the hosts are up.
    assert main(["--block-size", sizes, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"bench.wan: {message}")


@pytest.mark.parametrize("size", ["0", "0K"])
def test_an_empty_file_size_is_one_usage_line(size: str, capsys: pytest.CaptureFixture[str]) -> None:
    # A 0-byte file has no T_min to divide by; refused before anything is built.
    assert main(["--size", size, "--no-plot"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"bench.wan: invalid --size {size!r}: it must be at least 1 byte"]


def test_an_unknown_queue_is_one_usage_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--queue", "fq_codel", "--no-plot"])
    assert exit_.value.code == 2
    assert "--queue: invalid choice: 'fq_codel'" in capsys.readouterr().err
