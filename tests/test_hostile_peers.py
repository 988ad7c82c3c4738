"""The hostile peer table (issue 9, sections 3 and 7): one liar or staller beside one honest seeder.

For every row of :data:`tests.hostile.BEHAVIOURS`, the real :class:`Fetcher`
downloads from a hostile server and an honest :class:`BlockServer` (both in
this process, on 127.0.0.1). Whatever the hostile one does, the fetch
completes with the right bytes, nothing the hostile one sent reaches the file,
and the hostile peer is got rid of: banned when its bytes break the protocol,
dropped (its connection closed by the fetcher while the fetch still runs)
when it only stalls.

The honest seeder is rate-limited so the fetch lasts about a second: long
enough for the fetcher's response timeouts (shortened here) to fire.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from cascade.metafile import CascadeFile
from peer.fetcher import FetchPolicy
from tests.doubles import make_file, sha256_file
from tests.hostile import BEHAVIOURS, PROTOCOL_BREAKERS, Outcome, fetch_beside

pytestmark = pytest.mark.loopback

SIZE = 256 << 10
BLOCK = 4096
# With the seeder's 64 KiB burst, about a second for the whole file.
HONEST_RATE = 192 << 10
# "One byte a second" scaled like the timeouts below (a tenth of the defaults): one
# byte per 0.1 s, well inside every read timeout, as 1 s is inside the default 2-4 s.
PACE = 0.1
POLICY = FetchPolicy(
    first_response_timeout=0.4,
    min_response_timeout=0.4,
    stall_timeout=15.0,
    backoff_min=0.05,
    backoff_max=0.2,
    relist_min=0.2,
)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, CascadeFile]:
    folder = tmp_path_factory.mktemp("hostile")
    _, cf = make_file(folder, "d.bin", SIZE, BLOCK, seed=9)
    return folder / "d.bin", cf


@pytest.fixture(scope="module")
def outcomes(
    sample: tuple[Path, CascadeFile], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Outcome]]:
    """Every row fetched once (lazily): several tests look at the same run."""
    data, cf = sample
    folder = tmp_path_factory.mktemp("hostile-out")
    done: dict[str, Outcome] = {}

    class Lazy(dict[str, Outcome]):
        def __missing__(self, behaviour: str) -> Outcome:
            out = folder / f"{len(done)}.out"
            done[behaviour] = self[behaviour] = fetch_beside(behaviour, data, cf, out, POLICY, HONEST_RATE, PACE)
            assert sha256_file(out) == cf.file_hash, f"{behaviour}: wrong bytes in the output"
            return done[behaviour]

    yield Lazy()


@pytest.mark.parametrize("behaviour", list(BEHAVIOURS))
def test_fetch_completes_with_the_right_bytes(behaviour: str, outcomes: dict[str, Outcome]) -> None:
    o = outcomes[behaviour]
    assert o.result.complete
    assert o.hostile.stats.connections >= 1, "the hostile peer was never asked"
    # Every block came from the honest seeder: nothing the hostile peer sent was kept.
    assert o.hostile_name not in o.result.sources
    assert o.result.blocks_downloaded == o.result.blocks_total


@pytest.mark.parametrize("behaviour", sorted(PROTOCOL_BREAKERS))
def test_a_peer_that_breaks_the_protocol_is_banned(behaviour: str, outcomes: dict[str, Outcome]) -> None:
    o = outcomes[behaviour]
    assert o.hostile_name in o.result.banned


@pytest.mark.parametrize(
    "behaviour",
    [
        "half a block then silence",
        "accept and never answer",
        "one byte a second",
    ],
)
def test_a_stalling_peer_is_dropped_while_the_fetch_runs(behaviour: str, outcomes: dict[str, Outcome]) -> None:
    o = outcomes[behaviour]
    assert o.hostile_name not in o.result.banned, "stalling is not proof of malice: drop, do not ban"
    assert o.dropped_during_fetch, "the fetcher kept waiting on the stalled connection until the end"
