"""The fetch planner: every decision of a download, as a sans-IO state machine.

Like h11's ``Connection``, a :class:`Planner` is told what happened and says
what to do. It holds no socket, file, thread or clock; its randomness comes
from a ``random.Random`` passed in, and the time from the ``now`` each event
carries. The shell around it (:mod:`peer.fetcher`, :mod:`peer.connection`)
does the connecting, reading, writing and waiting, and calls it under one lock.

Events (methods) and the actions they return:

- :meth:`Planner.listed` / :meth:`Planner.list_failed`: a tracker reply (or
  none); :meth:`Planner.relist_due` says when to ask again.
- :meth:`Planner.next_connect` -> an address to connect to, or None;
  :meth:`Planner.connect_failed`; :meth:`Planner.connected` -> a
  :class:`Session` to run, or None (close the socket); :meth:`Planner.found_self`.
- :meth:`Planner.request` -> the blocks to ask a session's peer for
  (chosen by a replaceable policy function: :func:`choose_rarest`, which
  falls back to :func:`choose_blocks` for peers without maps).
- :meth:`Planner.answered`, :meth:`Planner.verified`,
  :meth:`Planner.not_present`, :meth:`Planner.released`: what a response was;
  :meth:`Planner.have_map`: a peer's have map (docs/protocol-extensions.md),
  which the block choice (:func:`choose_rarest`) follows.
- :meth:`Planner.offence` -> True when the peer is now banned;
  :meth:`Planner.failed`: a connection broke, timed out or was refused.
- :meth:`Planner.session_ended`.
- :meth:`Planner.lacks_member`: a peer does not serve one member of a
  collection (status 1); it is not asked for that member's blocks for
  ``member_lack_ttl``.
- :meth:`Planner.tick` -> the session to evict (a far-too-slow peer), if any;
  it also switches between file order and random order.
  :meth:`Planner.stall` -> the error line once no block came for too long.

Blocks: a block is handed out at random from a *window*, the next
``window_size`` missing blocks in file order, a quarter of the file
(``SWARM_WINDOW``): wide enough that fetchers hold different blocks and trade
them, narrow enough that the whole-file hash follows behind the download.
While a single peer answers us, blocks go out strictly in file order
(``sequential``). When none is left the endgame begins: a peer may be asked
for blocks other peers are still sending, and the first verified copy wins.
The lowest missing block holds up the whole-file hash: when it is late, a
second peer is asked for it too (the head-of-file race).

Peers: per peer the planner knows the blocks it lacks (answered "not present",
forgotten after ``lack_ttl``) and, once peers exchange them, the blocks it
holds (``PeerState.holds``); connect candidates are ranked (good, recently
seen, never failed first), a huge tracker reply is sampled, unreachable
addresses are set aside with a backoff, a far-too-slow peer gives its slot to
an untried one, and a peer is banned after ``ban_after`` offences.

Collections: the members of a collection are one block space, their blocks
concatenated in member order (:class:`Spans` maps a block back to its member
and the member's own block number, for the request). The same planner then
runs over every member at once, so one connection per peer carries requests
for any member.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_right
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from cascade.backoff import Backoff

PeerAddr = tuple[str, int]
# What the tracker tells about a peer: (ip, port, good) or (ip, port, good, last_seen).
PeerInfo = tuple[str, int, bool] | tuple[str, int, bool, int]

# With several peers, blocks are picked at random among the next quarter of
# the missing blocks: a trade-off between variety in the swarm and how much
# whole-file hashing is left for the end.
SWARM_WINDOW = 0.25
# Peers whose last_seen falls in the same bucket of this many seconds count as
# equally recent (arbitrary: finer ordering would only defeat the random spread).
RECENT_BUCKET = 60
# The ranking of candidates is rebuilt at least this often (arbitrary: backoffs of 0.2 s
# and more expire about on time, while a ranking of thousands is not redone per connect).
QUEUE_TTL = 0.25
# A rate is measured over windows of at least this many seconds (arbitrary: long
# enough to span several responses, short enough to follow a change).
RATE_WINDOW = 0.1
# Until its rate is measured, a connection keeps this many bytes of requests in flight
# (at least 4 requests): four blocks of the default 256 KiB, as before, but 128 requests
# (max_depth) rather than 4 for a collection of 4 KiB files, whose first RATE_WINDOW
# otherwise waits on round trips. Arbitrary, like max_depth.
START_INFLIGHT = 1 << 20


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Limits and timeouts of one download; the defaults live here and nowhere else."""

    # Peers downloaded from at once. 8 left a 16-fetcher swarm on 40 Mbit/s links with its fetchers'
    # uploads half idle (each reached only 8 of 16 peers); 16 took it from 1.83 x to 1.31 x the
    # bound at 256 KiB blocks (BENCHMARKS.md, WAN). Smaller swarms are unchanged.
    max_peers: int = 16
    # Give up when no block was verified for this long. Longer than a seeder's announce
    # interval (60 s, peer.common) by at least the longest wait between two of our tracker
    # listings (relist_max, while known peers fail us): a tracker restarted without --state
    # lists each seeder again only at its next announce, and a fetch started just then must
    # still be asking when it comes (60 s, the old default, left no room for that).
    stall_timeout: float = 90.0
    # Connects are non-blocking and run side by side (up to max_connecting), each
    # with this deadline: a peer that does not answer a SYN in 1.5 s is not worth a slot.
    connect_timeout: float = 1.5
    max_connecting: int = 128
    # Before a peer's throughput is known, its first whole response may take this long.
    first_response_timeout: float = 4.0
    # Once it is known, a whole response may take timeout_factor x its expected time, at least this.
    min_response_timeout: float = 2.0
    timeout_factor: float = 6.0
    ban_after: int = 2
    # A peer that failed is retried after backoff_min, doubling up to backoff_max, +-20 %.
    backoff_min: float = 0.2
    backoff_max: float = 10.0
    # An address never reached (refused or ignored our connect) is left alone this long,
    # doubling up to dead_retry_max: with thousands listed, retrying them soon crowds out
    # the addresses not tried yet.
    dead_retry: float = 5.0
    dead_retry_max: float = 30.0
    # Candidates kept at once (a huge tracker reply is sampled, best first), and
    # addresses remembered as unreachable: memory stays bounded whatever the tracker sends.
    max_candidates: int = 8192
    max_dead: int = 65536
    # Ask the tracker again after relist_min, doubling up to relist_max.
    relist_min: float = 0.5
    relist_max: float = 15.0
    # With a free slot and no candidate left, ask again after relist_hungry; doubled
    # while the lists bring no new address (see next_hungry_gap).
    relist_hungry: float = 0.01
    # A peer whose rate is below evict_ratio x the median of the others loses its
    # slot to an untried candidate (judged after evict_after s, one per evict_every s).
    evict_ratio: float = 0.125
    evict_after: float = 2.0
    evict_every: float = 1.0
    evict_cooldown: float = 5.0
    # Bytes per second over all connections; None for no limit.
    max_download_rate: int | None = None
    # A peer that answered "not present" is not asked for that block again for this long.
    lack_ttl: float = 1.0
    # A peer that does not serve a collection's member (status 1) is not asked for its blocks
    # for this long (arbitrary: a fetcher that lacked it may have started it since).
    member_lack_ttl: float = 10.0
    # The lowest missing block holds up the whole-file hash: when it has been in
    # flight this long, a second peer is asked for it too (the head-of-file race).
    # Twice target_latency: a healthy pipeline delivers it sooner.
    head_late: float = 0.4
    # Requests in flight per connection: enough for target_latency of data at the
    # measured rate, within [2, max_depth] and at most inflight_bytes; within [1, max_depth]
    # on a connection to a peer that does not super-seed while we download from at least
    # single_request_peers peers (see Planner.depth).
    target_latency: float = 0.2
    # ... and spare_latency of data (at least 2 requests) on a connection to a seeder with
    # upload to spare (its map offers every block): nobody else waits on that upload, and our
    # requests reach it through our own uplink, which on a slow host queues behind our uploads
    # (57-110 ms, round trips of 250-490 ms in 100/8x10, where one request at a time left the
    # seeder's link half idle: BENCHMARKS.md). Arbitrary: three times target_latency.
    spare_latency: float = 0.6
    inflight_bytes: int = 8 << 20
    max_depth: int = 128
    single_request_peers: int = 4

    @property
    def peer_backoff(self) -> Backoff:
        """When to retry a peer that failed: a connection refused, broken or timed out."""
        return Backoff(self.backoff_min, 2.0, self.backoff_max, jitter=0.2)

    @property
    def dead_backoff(self) -> Backoff:
        """When to retry an address that was never reached."""
        return Backoff(self.dead_retry, 2.0, self.dead_retry_max)


# --- per-peer state -----------------------------------------------------------


@dataclass(eq=False, slots=True)
class PeerState:
    """What the planner knows about one peer across its connections."""

    addr: PeerAddr
    good: bool = False
    # UNIX seconds the tracker last heard of it (0: unknown).
    last_seen: int = 0
    # A connect attempt is pending.
    connecting: bool = False
    # Why it was banned, for the final error line.
    ban_reason: str = ""
    # It answered a request (a block or "not present"): a live member of the swarm.
    answered: bool = False
    # Breaks ties between equal candidates at random (drawn from the planner's rng).
    order: float = 0.0
    sessions: int = 0
    banned: bool = False
    is_self: bool = False
    offences: int = 0
    failures: int = 0
    next_try: float = 0.0
    connected_once: bool = False
    # How to talk to it, learnt by the connection layer and kept across connections:
    # None until known, True once a connection answered twice, False for servers
    # that close after each response; plain: send requests without the KEEPOPEN marker.
    keepopen: bool | None = None
    plain: bool = False
    # Blocks and bytes delivered, folded in from its sessions.
    blocks: int = 0
    bytes: int = 0
    not_present: int = 0
    # Blocks in flight on any of its sessions (endgame never asks one peer twice).
    own: set[int] = field(default_factory=set)
    # Known to lack (answered "not present" since lacks_since) ...
    lacks: set[int] = field(default_factory=set)
    lacks_since: float = 0.0
    # Members of a collection it does not serve (status 1): member -> until when. Their
    # blocks are in ``lacks`` too, put back each time ``lacks`` is cleared.
    lacks_members: dict[int, float] = field(default_factory=dict)
    # ... and known to hold: one byte per block, None while unknown (filled in by
    # its have maps, docs/protocol-extensions.md, while a connection to it is open).
    holds: bytearray | None = None
    # How many blocks ``holds`` names; a complete peer (a seeder) holds them all.
    held: int = 0
    # The blocks a super-seeding peer asks us to request from it (None: all it holds).
    offer: bytearray | None = None
    # It answers have-map requests: None until asked, False for a server without them.
    maps: bool | None = None
    # It answered our last have-map request with status 1, and how often (see peer.connection).
    map_refused: bool = False
    map_strikes: int = 0
    # Since when its offer names no block we still need (None: it does, or no offer).
    offer_stale: float | None = None
    # Since when its offers have been empty with nothing in flight for us (None: not so;
    # IGNORED: for EMPTY_OFFER_PATIENCE, and they are no guide until one names a block).
    offer_empty: float | None = None
    # Its last map offered every block: a seeder with upload to spare (see have_map).
    spare: bool = False

    @property
    def name(self) -> str:
        return f"{self.addr[0]}:{self.addr[1]}"


@dataclass(eq=False, slots=True)
class Session:
    """One connection's worth of talking to a peer: its requests in flight and its measured rate."""

    peer: PeerState
    outstanding: deque[int] = field(default_factory=deque)
    started: float = 0.0
    # Its slot was given to an untried peer (see pick_evictee): not a failure of the peer.
    evicted: bool = False
    # Throughput in bytes/s, 0 until measured over a window of at least RATE_WINDOW.
    rate: float = 0.0
    win_start: float = 0.0
    win_bytes: int = 0
    blocks: int = 0
    bytes: int = 0
    not_present: int = 0


# --- blocks -------------------------------------------------------------------


class Spans:
    """A collection's members as one block space: member ``m`` holds blocks ``starts[m]`` to ``starts[m + 1] - 1``.

    ``counts`` are the members' block counts, in member order (0 for a member with no block).
    """

    def __init__(self, counts: Iterable[int]) -> None:
        starts = array("Q", [0])
        for c in counts:
            starts.append(starts[-1] + c)
        self.starts = starts
        self.block_count = starts[-1]

    def __len__(self) -> int:
        return len(self.starts) - 1

    def member(self, i: int) -> int:
        """The member that holds block ``i`` (of the whole space); raises IndexError outside it."""
        if not 0 <= i < self.block_count:
            raise IndexError(f"block {i} is outside 0..{self.block_count - 1}")
        # The last start <= i; a member with no block shares its start with the next one.
        return bisect_right(self.starts, i) - 1

    def locate(self, i: int) -> tuple[int, int]:
        """(member, the member's own block number) of block ``i``."""
        m = self.member(i)
        return m, i - self.starts[m]

    def blocks(self, m: int) -> range:
        """The blocks of member ``m`` in the whole space."""
        return range(self.starts[m], self.starts[m + 1])


class Blocks:
    """The block side of the plan: what is verified, missing, in flight; O(1) per block.

    ``inflight`` counts the outstanding requests per block; ``rest`` holds the
    blocks missing at the start in file order, ``cursor`` how far they were
    handed out; ``window`` and ``rare`` the blocks to draw from at random
    (``rare``: blocks some peer lacked, probably rare in the swarm).
    """

    def __init__(self, have: bytearray, head_late: float) -> None:
        self.have = have
        count = self.block_count = len(have)
        self.verified = have.count(1)
        self.rest = array("I" if count < 1 << 32 else "Q", [i for i, v in enumerate(have) if not v])
        self.cursor = 0
        self.window: list[int] = []
        self.rare: list[int] = []
        self.window_size = len(self.rest)
        # In file order while a single peer serves us.
        self.sequential = True
        self.inflight: dict[int, int] = {}
        # The lowest block not verified yet, where the whole-file hash waits; since when, and
        # whether a second copy was asked for.
        self.head = -1  # set by the first pick
        self.head_since = 0.0
        self.head_raced = -1
        self.head_late = head_late
        self.endgame = False
        # Per block, how many connected peers with a have map hold it without holding
        # the whole file: the rarity for rarest-first. Complete peers are not counted,
        # so "0" means "only the seeders have it".
        self.avail = array("I", bytes(4 * count))

    @property
    def complete(self) -> bool:
        return self.verified == self.block_count

    def release(self, i: int, lacked: bool = False) -> None:
        """A request for block ``i`` ended without a copy (``lacked``: the peer has none)."""
        c = self.inflight.get(i)
        if c is None:
            return
        if c > 1:
            self.inflight[i] = c - 1
            return
        del self.inflight[i]
        if not self.have[i]:
            (self.rare if lacked else self.window).append(i)


# The block choice: (blocks, peer, want, now, rng) -> the blocks to ask ``peer`` for, recorded
# as in flight. One function, so that a rarest-first choice replaces it whole.
ChooseBlocks = Callable[[Blocks, PeerState, int, float, random.Random], list[int]]


def choose_blocks(blocks: Blocks, peer: PeerState, want: int, now: float, rng: random.Random) -> list[int]:
    """Up to ``want`` blocks for ``peer``: the late head first, then at random from the window, then the endgame."""
    got: list[int] = []
    window, inflight, lacks, have = blocks.window, blocks.inflight, peer.lacks, blocks.have
    if not blocks.sequential and len(window) < blocks.window_size and blocks.cursor < len(blocks.rest):
        take = min(blocks.window_size - len(window), len(blocks.rest) - blocks.cursor)
        window.extend(blocks.rest[blocks.cursor : blocks.cursor + take])
        blocks.cursor += take
    _race_head(blocks, peer, got, now)
    # Blocks some peer lacked go preferably to declared seeders, which have
    # them all; other peers first try the blocks nobody has refused yet.
    # (In sequential mode the window holds only blocks to retry.)
    first, second = (blocks.rare, window) if peer.good else (window, blocks.rare)
    _draw(first, want, got, lacks, have, inflight, rng)
    _draw(second, want, got, lacks, have, inflight, rng)
    if blocks.sequential:
        rest, cursor, skipped = blocks.rest, blocks.cursor, 0
        while len(got) < want and cursor < len(rest) and skipped < 64:
            i = rest[cursor]
            cursor += 1
            if have[i]:
                continue
            if i in lacks:
                # This peer lacks it: keep it for a retry and look further on.
                window.append(i)
                skipped += 1
                continue
            inflight[i] = inflight.get(i, 0) + 1
            got.append(i)
        blocks.cursor = cursor
    if not window and not blocks.rare and blocks.cursor >= len(blocks.rest) and len(got) < want and inflight:
        # Endgame: duplicate requests other peers have in flight, least-asked first.
        blocks.endgame = True
        # Not from this peer twice: neither a block in flight at it nor one picked just now.
        own = peer.own | set(got) if got else peer.own
        candidates = [(c, rng.random(), i) for i, c in inflight.items() if i not in own and i not in lacks]
        candidates.sort()
        for _c, _r, i in candidates[: want - len(got)]:
            inflight[i] += 1
            got.append(i)
    return got


def _race_head(blocks: Blocks, peer: PeerState, got: list[int], now: float) -> None:
    """Ask ``peer`` too for the lowest missing block when it is late.

    The whole-file hash cannot pass this block: a peer that sits on it (until
    its response timeout, seconds) would leave the rest of the file to hash
    after the download. One extra copy at most; amortised O(1).
    """
    have, count, head = blocks.have, blocks.block_count, max(blocks.head, 0)
    while head < count and have[head]:
        head += 1
    if head != blocks.head:
        blocks.head, blocks.head_since = head, now
    if head >= count or head in peer.lacks or head in peer.own:
        return
    if blocks.inflight.get(head) == 1 and blocks.head_raced != head and now - blocks.head_since > blocks.head_late:
        blocks.head_raced = head
        blocks.inflight[head] = 2
        got.append(head)


def _draw(
    pool: list[int],
    want: int,
    got: list[int],
    lacks: set[int],
    have: bytearray,
    inflight: dict[int, int],
    rng: random.Random,
) -> None:
    """Move random blocks from ``pool`` to ``got`` (and in flight) until ``want``, skipping ``lacks``."""
    misses = 0
    while len(got) < want and pool and misses < 16:
        j = rng.randrange(len(pool))
        i = pool[j]
        if i in lacks:
            misses += 1
            continue
        last = pool.pop()
        if j < len(pool):
            pool[j] = last
        if have[i] or i in inflight:
            # Verified, or handed out by the have-map choice (choose_rarest): release() puts it back.
            continue
        inflight[i] = inflight.get(i, 0) + 1
        got.append(i)


# With have maps, a file of up to FULL_SCAN blocks has all its candidates looked at for
# each choice (from its first block). A larger one has at most SCAN_LIMIT looked at, from a
# random start, so that a file of millions of blocks costs the same per request as one of
# thousands: the rarest of a random window. 4,096 candidates took 41 % of a fetcher's
# Python in a 1 + 4 swarm of 26,215 blocks (10 KiB blocks, as another implementation
# makes them); 256 cut the fetchers' CPU by a fifth (BENCHMARKS.md). Both arbitrary, but the
# window holds a whole pipeline (FetchPolicy.max_depth, 128), so one choice can fill it.
FULL_SCAN = 4096
SCAN_LIMIT = 256
# How long a seeder's offer that names no block we need is waited out (for a fresh
# map) before we ask it for blocks it did not offer us. Arbitrary: a few refreshes,
# behind a pipeline of blocks on a shared upload.
OFFER_PATIENCE = 5.0
# ... and how long while nothing at all is in flight for us: no other peer holds a block
# we lack (or we would be fetching it), so the seeder alone has what we need and the
# offer only delays it (a block whose only copies left with a fetcher that quit, say).
# Not 0: the seeder's next map, a fraction of a second away, usually brings an offer we
# can use, and asking around it duplicates a block being sent to another fetcher.
# Arbitrary: a few map refreshes.
STARVED_PATIENCE = 1.5
# How long an empty offer ("wait your turn") is obeyed while nothing at all is in flight for
# us. Our seeder's turns rotate within seconds, but a server that sends empty offers forever
# (another implementation's idea of "no preference", say) would otherwise stall a fetch whose
# only source it is until its --timeout. Arbitrary: several turns of a large swarm.
EMPTY_OFFER_PATIENCE = 10.0
# PeerState.offer_empty once that wait is over.
IGNORED = float("-inf")


def choose_rarest(blocks: Blocks, peer: PeerState, want: int, now: float, rng: random.Random) -> list[int]:
    """Up to ``want`` blocks for ``peer``, using what the peers' have maps say.

    A peer without a map (an old server, or before its first map) gets
    :func:`choose_blocks`. A peer with one is asked only for blocks it holds:

    - a seeder (complete, and sending offers) only for the blocks it offers
      us, rarest first: the seeder offers each fetcher different blocks, the
      ones it sent least, so each block leaves it about once and the rest
      comes from the other fetchers. An offer that names nothing we still
      need is waited out for ``OFFER_PATIENCE`` (``STARVED_PATIENCE`` while
      nothing is in flight), an empty one while anything is in flight and for
      ``EMPTY_OFFER_PATIENCE`` after, then ignored: the seeder is then asked
      only for blocks no other peer holds;
    - any other peer (a finished fetcher too) for the rarest of the blocks it
      holds (fewest holders), at random among equals, so the swarm's blocks
      spread evenly;
    - in file order while a single peer answers us (the whole-file hash follows);
    - when every missing block is in flight: the endgame, as :func:`choose_blocks`.
    """
    holds = peer.holds
    if holds is None:
        # Its map is on its way (a new connection to a peer that has them): wait for it.
        return [] if peer.maps else choose_blocks(blocks, peer, want, now, rng)
    have, inflight, lacks, avail = blocks.have, blocks.inflight, peer.lacks, blocks.avail
    count = blocks.block_count
    # A seeder proper: complete, and super-seeding (a fetcher that finished sends no offer).
    seeder = peer.held >= count and peer.offer is not None
    offer = peer.offer if seeder else None
    if offer is not None:
        # Follow the offer while it names a block we still need (in flight or not). One that
        # names nothing we need is waited out until the next map (it was used up), but after
        # OFFER_PATIENCE it is no guide: we got its blocks elsewhere, which the seeder cannot know.
        o, h = int.from_bytes(offer, "big"), int.from_bytes(have, "big")
        if o & (o ^ h):
            peer.offer_stale = None
        elif not o:
            # An empty offer: the seeder has nothing for us right now (others are being
            # sent new blocks, or it waits for its blocks to spread); ask again, not around
            # it, unless nothing at all has been in flight for us for EMPTY_OFFER_PATIENCE:
            # then its empty offers are no guide until one names a block (see have_map).
            peer.offer_stale = None
            waited = peer.offer_empty
            if waited != IGNORED:
                if waited is None or inflight:
                    peer.offer_empty = now
                    return []
                if now - waited < EMPTY_OFFER_PATIENCE:
                    return []
                peer.offer_empty = IGNORED
            offer = None
        elif peer.offer_stale is None:
            peer.offer_stale = now
            return []
        elif now - peer.offer_stale < (OFFER_PATIENCE if inflight else STARVED_PATIENCE):
            return []
        else:
            offer = None
    # File order while one peer serves us, within its offer if it super-seeds (the offer keeps
    # us apart from other fetchers; file order lets the whole-file hash follow the download:
    # in random order a lone 1 GiB fetch left 0.7 s of it for after the last block).
    sequential = blocks.sequential
    whole = count <= FULL_SCAN
    start = 0 if sequential or whole else rng.randrange(count)
    # The blocks it holds (only those it offers, when it is a seeder whose offer guides us)
    # that we lack, as one byte per block (0 or 1, like every map): worked out a machine word
    # at a time, and the scan below visits only those. A byte at a time in Python, this scan
    # was most of a fetcher's planning on a swarm of 1 + 8 (BENCHMARKS.md).
    mask = int.from_bytes(holds, "big") & ~int.from_bytes(have, "big")
    if seeder and offer is not None:
        mask &= int.from_bytes(offer, "big")
    wanted = mask.to_bytes(count, "big")
    starved = seeder and offer is None
    picks: list[tuple[int, float, int]] = []
    scanned = 0
    # From ``start`` to the end, then from 0 up to ``start``.
    for lo, hi in ((start, count), (0, start)):
        i = wanted.find(1, lo, hi)
        while i >= 0:
            # An offer being no guide, a seeder is asked only for what nobody else holds.
            if i not in inflight and i not in lacks and not (starved and avail[i]):
                picks.append((0 if sequential else avail[i], rng.random(), i))
                scanned += 1
                if (scanned >= SCAN_LIMIT and not whole) or (sequential and scanned >= want):
                    break
            i = wanted.find(1, i + 1, hi)
        else:
            continue
        break
    got: list[int] = []
    if picks:
        ordered = picks if sequential else sorted(picks)
        for _a, _r, i in ordered[:want]:
            inflight[i] = 1
            got.append(i)
        return got
    if count - blocks.verified <= len(inflight) and inflight:
        # Endgame: every missing block is in flight somewhere. Ask this peer too for the
        # least-asked ones it holds (never one already in flight at it).
        blocks.endgame = True
        own = peer.own
        # A seeder's upload is the swarm's bottleneck: it duplicates only blocks no partial peer
        # holds. One with upload to spare too: the endgame's copies would come from its tail.
        busy = seeder or peer.spare
        candidates = [
            (c, rng.random(), i)
            for i, c in inflight.items()
            if holds[i] and i not in own and i not in lacks and not (busy and avail[i])
        ]
        candidates.sort()
        for _c, _r, i in candidates[:want]:
            inflight[i] += 1
            got.append(i)
    return got


def _count(avail: array[int], flags: bytes | bytearray, step: int) -> None:
    """Add ``step`` to ``avail[i]`` for every block ``i`` whose byte in ``flags`` is 1."""
    i = flags.find(1)
    while i >= 0:
        avail[i] += step
        i = flags.find(1, i + 1)


# --- choosing peers: small pure decisions ------------------------------------


def candidate_rank(p: PeerState) -> tuple[int, bool, bool, int, float]:
    """Sort key for connecting: least failures, peers that answered before, good, recently seen, random."""
    return (p.failures + p.offences, not p.answered, not p.good, -(p.last_seen // RECENT_BUCKET), p.order)


# A candidate from a tracker reply: address, good flag, last_seen, connects failed so far.
Candidate = tuple[PeerAddr, bool, int, int]


def sample_best(infos: list[Candidate], k: int, rng: random.Random | None = None) -> list[Candidate]:
    """The ``k`` best new addresses of a tracker reply, at random among equals.

    Never-failed first, then good, then recently seen. At random, so that a
    tracker reply larger than ``k`` yields a different sample each time it is
    asked for again, and the addresses not tried yet come before those that
    failed before. Without ``rng``, a fresh unseeded one.
    """
    if len(infos) <= k:
        return infos
    rng = rng or random.Random()
    # Grouped by rank rather than sorted: O(n) for the 65,536 records a reply may hold.
    groups: dict[tuple[int, bool, int], list[Candidate]] = {}
    for info in infos:
        _addr, good, seen, failures = info
        groups.setdefault((-failures, good, seen // RECENT_BUCKET), []).append(info)
    out: list[Candidate] = []
    for rank in sorted(groups, reverse=True):
        group = groups[rank]
        left = k - len(out)
        if len(group) > left:
            out += rng.sample(group, left)
            break
        rng.shuffle(group)
        out += group
    return out


def next_hungry_gap(gap: float, new: int, downloading: bool, policy: FetchPolicy) -> float:
    """How soon to ask the tracker again while a slot is free and no candidate is left.

    Lists that brought ``new`` addresses are worth asking again at once;
    others less and less: up to ``relist_min / 2`` while nothing downloads
    (as before any peer is found), up to ``relist_max`` while a peer does.
    """
    if new:
        return policy.relist_hungry
    return min(policy.relist_max if downloading else policy.relist_min / 2, 2 * gap)


def connect_budget(free_slots: int, pending: int, failure_streak: int, limit: int) -> int:
    """How many more connects to start: one per free slot, plus one per recent failure.

    A swarm full of dead addresses widens the fan-out (up to ``limit``
    pending); a healthy one opens about as many connections as it can use.
    """
    if free_slots <= 0:
        return 0
    return max(0, min(limit, free_slots + failure_streak) - pending)


def pick_evictee(sessions: Iterable[Session], now: float, policy: FetchPolicy, block_size: int = 0) -> Session | None:
    """The session to give up for an untried peer: far slower than the median of the others, or None.

    Only sessions older than ``evict_after`` are judged; the median is over
    those with a measured rate. One that has not delivered a block yet counts
    as rate 0 once even one ``block_size`` block in its lifetime would have been
    too slow: a 1 MiB block on a shared 40 Mbit/s upload takes seconds, and
    evicting it first throws away the part already sent. Never evicted (its rate
    still counts in the median): a super-seeding peer (one that sends offers: the only source of the blocks no
    fetcher holds yet, its upload spread over all of them), and a session whose
    peer has maps but whose map has not come yet (nothing could be asked of it;
    on a loaded machine its thread may not even have run).
    """
    judged = [s for s in sessions if not s.evicted and now - s.started >= policy.evict_after]
    measured = sorted(s.rate for s in judged if s.rate > 0)
    if len(judged) < 2 or not measured:
        return None
    median = measured[len(measured) // 2]
    bar = policy.evict_ratio * median
    # A silent session's rate is below block_size / its age, and not known to be lower.
    slow = [
        s
        for s in judged
        if s.rate < bar
        and (s.rate > 0 or block_size <= bar * (now - s.started))
        and s.peer.offer is None
        and not (s.peer.maps and s.peer.holds is None)
    ]
    return min(slow, key=lambda s: s.rate) if slow else None


def banned_message(peers: list[PeerState], waited: str) -> str | None:
    """The stall message when every peer that could be reached was banned, saying why; else None."""
    reached = [p for p in peers if p.connected_once or p.banned]
    if not reached or not all(p.banned for p in reached):
        return None
    shown = "; ".join(f"{p.name} {p.ban_reason}" for p in reached[:3])
    more = f" (and {len(reached) - 3} more)" if len(reached) > 3 else ""
    which = "its only peer was" if len(reached) == 1 else f"all {len(reached)} peers it reached were"
    return f"no block arrived for {waited}: {which} banned: {shown}{more}"


def is_local(ip: str) -> bool:
    """An address of this machine (where a peer listing our own port is ourselves)."""
    return ip.startswith("127.") or ip == "0.0.0.0"


@dataclass(frozen=True, slots=True)
class Tick:
    """What to do as time passes: ``evict`` a session (shut its connection), log a new block ``order``."""

    evict: Session | None
    # "file" or "random" when the block order just changed, with the peers that answer; else None.
    order: tuple[str, int] | None


@dataclass(frozen=True, slots=True)
class Verified:
    """What a verified block changed: ``first`` copy of it, and the download is now ``complete``."""

    first: bool
    complete: bool


# --- the planner ----------------------------------------------------------------


class Planner:
    """The decisions of one download: which blocks to ask whom for, whom to connect to, drop, ban or evict.

    ``have`` is one byte per block, 1 for the blocks already verified (the
    planner keeps its own copy). ``max_sessions`` is how many connections may
    download at once; ``max_depth`` how many requests one may keep in flight.
    Not thread-safe: the shell calls it under one lock.
    """

    def __init__(
        self,
        have: bytearray,
        block_size: int,
        policy: FetchPolicy,
        rng: random.Random,
        *,
        max_sessions: int,
        max_depth: int,
        start: float,
        my_port: int | None = None,
        choose: ChooseBlocks = choose_rarest,
        spans: Spans | None = None,
    ) -> None:
        self.policy = policy
        # A collection's members (``have`` then covers them all, see Spans); None for one file.
        self.spans = spans
        self.rng = rng
        self.blocks = Blocks(bytearray(have), policy.head_late)
        self.block_size = block_size
        self.max_sessions = max_sessions
        self.max_depth = max_depth
        self.my_port = my_port
        self.choose = choose
        self.peers: dict[PeerAddr, PeerState] = {}
        # Addresses that refused or ignored a connect: address -> (retry at, failures), oldest first.
        self.dead: OrderedDict[PeerAddr, tuple[float, int]] = OrderedDict()
        self.sessions: set[Session] = set()
        # Connects started and not finished.
        self.pending = 0
        # Connects failed in a row: widens the fan-out (see connect_budget).
        self.streak = 0
        self.ever_connected = False
        self.list_error: str | None = None
        self.started = start
        self.last_progress = start
        self.hungry_gap = policy.relist_hungry
        self.relist_every = policy.relist_min
        self.next_list = start
        self.last_list = start - policy.relist_min
        self.last_evict = float("-inf")
        # Candidates ranked best last (see candidates); rebuilt when stale or marked dirty.
        self._queue: list[PeerState] = []
        self._queue_until = float("-inf")
        self._queue_dirty = True

    # --- state --------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return self.blocks.complete

    @property
    def sequential(self) -> bool:
        """Blocks go out in file order (fewer than two peers answer us)."""
        return self.blocks.sequential

    def free_slots(self) -> int:
        return self.max_sessions - len(self.sessions)

    def depth(self, session: Session) -> int:
        """Requests to keep in flight on ``session``: target_latency of data at its rate, or spare_latency."""
        if session.rate <= 0:
            return min(max(4, START_INFLIGHT // self.block_size), self.max_depth)
        pol = self.policy
        peer = session.peer
        latency = pol.spare_latency if peer.spare else pol.target_latency
        d = int(session.rate * latency / self.block_size) + 1
        # A second request keeps a connection busy over the round trip between two responses.
        # Once several peers keep us busy, a slow connection (a block takes longer than
        # target_latency) is a share of a holder's upload that many downloaders split, and a
        # second request there only queues a block in front of each fresh block that holder
        # would pass on to us: 0.8 s of 256 KiB at a fifteenth of 40 Mbit/s. A super-seeder's
        # connections keep two: its upload is the swarm's bottleneck, and must not idle; so do
        # a seeder's with upload to spare (offer None, but no share of anything).
        shared = peer.offer is None and not peer.spare
        low = 1 if shared and len(self.sessions) >= pol.single_request_peers else 2
        return max(low, min(self.max_depth, d))

    def response_timeout(self, session: Session) -> float:
        """How long the next whole response on ``session`` may take."""
        pol = self.policy
        if session.rate <= 0:
            return pol.first_response_timeout
        expected = len(session.outstanding) * self.block_size / session.rate
        return max(pol.min_response_timeout, pol.timeout_factor * expected)

    # --- the tracker ------------------------------------------------------------

    def listed(self, peers: Iterable[PeerInfo], now: float) -> int:
        """A tracker reply; returns how many addresses were new.

        At most ``max_candidates`` are kept (the best, see :func:`sample_best`);
        an address that failed recently is skipped until its retry time.
        """
        known, dead = self.peers, self.dead
        fresh: list[Candidate] = []
        seen: set[PeerAddr] = set()
        for info in peers:
            ip, port, good = info[0], info[1], info[2]
            last_seen = info[3] if len(info) == 4 else 0
            addr = (ip, port)
            if port == 0:
                continue
            p = known.get(addr)
            if p is not None:
                p.good = p.good or good
                p.last_seen = max(p.last_seen, last_seen)
                continue
            gone = dead.get(addr)
            if (gone is not None and gone[0] > now) or addr in seen:
                continue
            seen.add(addr)
            fresh.append((addr, good, last_seen, 0 if gone is None else gone[1]))
        room = max(0, self.policy.max_candidates - len(known))
        self._queue_dirty = True
        for addr, good, last_seen, failures in sample_best(fresh, room, self.rng):
            p = known[addr] = PeerState(addr, good, last_seen, failures=failures, order=self.rng.random())
            dead.pop(addr, None)
            if self.my_port is not None and addr[1] == self.my_port and is_local(addr[0]):
                p.is_self = True
        if self.list_error is not None:
            self.list_error = None
        return len(fresh)

    def list_failed(self, message: str) -> None:
        """The tracker could not be asked; ``message`` goes into the stall line."""
        self.list_error = message

    def hungry(self, now: float) -> bool:
        """A slot is free, no candidate is left to try and more connects could start."""
        return self.free_slots() > 0 and self.pending < self.policy.max_connecting and not self.candidates(now)

    def relist_due(self, now: float) -> bool:
        """Time to ask the tracker: on the doubling schedule, or hungry for candidates."""
        # Written as the time it falls due, exactly as wait_time computes it (a difference
        # of floats could stay a hair short of the gap however often the time is read).
        return now >= self.next_list or (self.hungry(now) and now >= self.last_list + self.hungry_gap)

    def relisted(self, new: int, now: float) -> None:
        """The tracker was asked (``new`` addresses came back; 0 on an error): schedule the next time."""
        pol = self.policy
        self.last_list = now
        self.next_list = now + self.relist_every
        self.relist_every = min(pol.relist_max, self.relist_every * 2)
        self.hungry_gap = next_hungry_gap(self.hungry_gap, new, bool(self.sessions), pol)

    def begin(self, now: float) -> None:
        """The download starts now: ask the tracker at once, unless candidates were given already."""
        self.started = self.last_progress = now
        self.next_list = now + self.relist_every if self.peers else now
        self.last_list = now if self.peers else now - self.policy.relist_min

    def wait_time(self, now: float, tick: float) -> float:
        """How long the shell may wait before calling again (a relist may be due sooner)."""
        wait = tick
        if self.hungry(now):  # wait only until the tracker may be asked again
            wait = max(0.0, min(wait, self.last_list + self.hungry_gap - now))
        if self._queue and self.budget() > 0:
            wait = 0.0  # next_connect stopped at the shell's batch: go on at once
        return wait

    # --- connecting -------------------------------------------------------------

    def budget(self) -> int:
        return connect_budget(self.free_slots(), self.pending, self.streak, self.policy.max_connecting)

    def _eligible(self, p: PeerState, now: float) -> bool:
        return not p.sessions and not p.connecting and not p.banned and not p.is_self and p.next_try <= now

    def candidates(self, now: float) -> list[PeerState]:
        """The eligible candidates, best last; ranked once, then consumed by next_connect.

        Re-ranking thousands of candidates for each handful of connects costs
        more than the connects: the ranking is rebuilt only when peers were
        added or a session ended, or after QUEUE_TTL (backoffs expire).
        """
        if self._queue_dirty or now >= self._queue_until:
            self._queue_dirty = False
            self._queue_until = now + QUEUE_TTL
            eligible = [p for p in self.peers.values() if self._eligible(p, now)]
            self._queue = sorted(eligible, key=candidate_rank, reverse=True)
        queue = self._queue
        while queue and (self.peers.get(queue[-1].addr) is not queue[-1] or not self._eligible(queue[-1], now)):
            queue.pop()
        return queue

    def next_connect(self, now: float) -> PeerAddr | None:
        """The next address to connect to, best first, while the budget allows (see connect_budget)."""
        if self.budget() <= 0:
            return None
        queue = self.candidates(now)
        while queue:
            p = queue.pop()
            if self.peers.get(p.addr) is not p or not self._eligible(p, now):  # gone, or re-added anew
                continue
            p.connecting = True
            self.pending += 1
            return p.addr
        return None

    def connect_failed(self, addr: PeerAddr, now: float) -> None:
        """A connect was refused or timed out: back off a known peer, set aside one never reached."""
        p = self.peers.get(addr)
        if p is None:
            return
        if p.connecting:
            p.connecting = False
            self.pending -= 1
        self.streak = min(self.streak + 1, self.policy.max_connecting)
        if p.connected_once or p.blocks:
            self._backoff(p, now)
            return
        # Never reached: it leaves the candidates (a tracker may list thousands like it) for a
        # small record that keeps it from being tried again before its retry time.
        failures = p.failures + 1
        del self.peers[p.addr]
        self.dead[p.addr] = (now + self.policy.dead_backoff.delay(failures), failures)
        self.dead.move_to_end(p.addr)
        if len(self.dead) > self.policy.max_dead:
            self.dead.popitem(last=False)

    def connected(self, addr: PeerAddr, now: float, stopping: bool = False) -> Session | None:
        """A connect succeeded: the session to run on it, or None (close it; the peer stays a candidate)."""
        p = self.peers.get(addr)
        if p is None:  # cannot happen: a connecting peer stays known
            return None
        if p.connecting:
            p.connecting = False
            self.pending -= 1
        self.streak = 0
        if self.free_slots() <= 0 or stopping:
            # Another connect filled the slot first: it stays a candidate, untouched.
            self._queue_dirty = True
            return None
        session = Session(p, started=now, win_start=now)
        p.sessions += 1
        self.sessions.add(session)
        return session

    def reached(self, session: Session) -> None:
        """The session's connection is up and it is not ourselves."""
        if not session.peer.connected_once:
            session.peer.connected_once = True
            self.ever_connected = True

    def found_self(self, session: Session) -> None:
        """The session's connection turned out to be to ourselves: never use that address."""
        session.peer.is_self = True

    # --- blocks ---------------------------------------------------------------

    def request(self, session: Session, want: int, now: float) -> list[int]:
        """Up to ``want`` blocks to ask the session's peer for (recorded as in flight on it)."""
        peer = session.peer
        if peer.lacks and now - peer.lacks_since > self.policy.lack_ttl:
            peer.lacks.clear()
            if peer.lacks_members:
                peer.lacks_since = now
                self._relack_members(peer, now)
        got = self.choose(self.blocks, peer, want, now, self.rng)
        peer.own.update(got)
        session.outstanding.extend(got)
        return got

    def lacks_member(self, session: Session, i: int, now: float) -> bool:
        """The session's peer does not serve the member of block ``i`` (status 1; the server closes).

        It is not asked for that member's blocks for ``member_lack_ttl``. Returns True
        when the peer should back off before the next connection: it delivered no block
        on this one (a peer that serves nothing we need must not cost a connect per member).
        """
        spans = self.spans
        if spans is None or not 0 <= i < spans.block_count:
            return True
        peer = session.peer
        peer.lacks_members[spans.member(i)] = now + self.policy.member_lack_ttl
        if not peer.lacks:
            peer.lacks_since = now
        self._relack_members(peer, now)
        if session.blocks:
            return False
        self._backoff(peer, now)
        return True

    def _relack_members(self, peer: PeerState, now: float) -> None:
        """Put the blocks of the members ``peer`` lacks back into its lacks; forget those expired."""
        spans = self.spans
        assert spans is not None  # lacks_members is filled only for a collection
        for m, until in list(peer.lacks_members.items()):
            if until <= now:
                del peer.lacks_members[m]
            else:
                peer.lacks.update(spans.blocks(m))

    def have(self, i: int) -> bool:
        """Block ``i`` is verified already (another copy won the endgame): the body is not written."""
        return bool(self.blocks.have[i])

    def answered(self, session: Session) -> bool:
        """The peer answered a request (a block or "not present"); True the first time."""
        peer = session.peer
        if peer.answered:
            return False
        peer.answered = True
        return True

    def _received(self, session: Session, length: int, now: float) -> None:
        session.win_bytes += length
        elapsed = now - session.win_start
        if elapsed >= RATE_WINDOW:
            measured = session.win_bytes / elapsed
            session.rate = measured if session.rate <= 0 else 0.5 * session.rate + 0.5 * measured
            session.win_start, session.win_bytes = now, 0

    def verified(self, session: Session, i: int, length: int, now: float) -> Verified:
        """The response to the oldest request of ``session``, block ``i``, was verified and written."""
        peer, blocks = session.peer, self.blocks
        session.outstanding.popleft()
        peer.own.discard(i)
        blocks.inflight.pop(i, None)
        first = not blocks.have[i]
        if first:
            blocks.have[i] = 1
            blocks.verified += 1
            self.last_progress = now
            session.blocks += 1
            session.bytes += length
            peer.failures = 0
        self._received(session, length, now)
        return Verified(first, blocks.complete)

    def duplicate(self, session: Session, i: int, length: int, now: float) -> None:
        """The oldest request of ``session``, block ``i``, came back after another copy won."""
        session.outstanding.popleft()
        session.peer.own.discard(i)
        self.blocks.release(i)
        self._received(session, length, now)

    def not_present(self, session: Session, i: int, now: float) -> None:
        """The peer answered "not present" for the oldest request of ``session``, block ``i``."""
        peer = session.peer
        session.outstanding.popleft()
        peer.own.discard(i)
        self.blocks.release(i, lacked=True)
        if not peer.lacks:
            peer.lacks_since = now
        peer.lacks.add(i)
        session.not_present += 1
        holds = peer.holds
        if holds is not None and holds[i]:
            # Its map was out of date (or lied): it holds one block less (recounted; rare).
            fixed = bytes(holds[:i]) + b"\x00" + bytes(holds[i + 1 :])
            self.have_map(session, fixed, None if peer.offer is None else bytes(peer.offer), now)

    def have_map(self, session: Session, held: bytes, offer: bytes | None, now: float) -> None:
        """The session's peer sent its have map (one byte per block, 0 or 1) and maybe its offer to us."""
        peer = session.peer
        count = self.blocks.block_count
        holds = bytearray(held)
        n = holds.count(1)
        old = peer.holds
        if old is not None and peer.held < count and n < count and len(old) == len(holds):
            # A partial peer's next map: only the blocks it gained (or lost) change the counts.
            # Every few tenths of a second from every peer, recounting all it holds was a
            # fetcher's second-largest planning cost on a swarm of 1 + 8.
            before, after = int.from_bytes(old, "big"), int.from_bytes(holds, "big")
            _count(self.blocks.avail, (after & ~before).to_bytes(count, "big"), 1)
            _count(self.blocks.avail, (before & ~after).to_bytes(count, "big"), -1)
        else:
            self._forget_map(peer)
            if n < count:
                _count(self.blocks.avail, holds, 1)
        peer.maps = True
        peer.holds = holds
        peer.held = n
        # An offer of every block steers nothing: the seeder has upload to spare (see
        # peer.superseed), and it is asked like any complete peer, a map request on its way or not.
        peer.spare = offer is not None and 0 not in offer
        peer.offer = None if offer is None or peer.spare else bytearray(offer)
        if peer.offer is None or 1 in peer.offer:
            peer.offer_empty = None  # an empty offer's wait starts again at the next one

    def _forget_map(self, peer: PeerState) -> None:
        """Take a peer's map out of the block counts (it is replaced, or the peer is gone)."""
        holds = peer.holds
        if holds is None:
            return
        if peer.held < self.blocks.block_count:
            _count(self.blocks.avail, holds, -1)
        peer.holds = None
        peer.offer = None
        peer.spare = False
        peer.held = 0

    def idle(self, session: Session, now: float) -> None:
        """Nothing could be asked of the session's peer: its rate window restarts."""
        session.win_start = now
        session.win_bytes = 0

    # --- offences and failures ----------------------------------------------------

    def offence(self, session: Session, reason: str, now: float) -> bool:
        """The peer broke the protocol or sent bad data: True when it is now banned, else it backs off."""
        peer = session.peer
        peer.offences += 1
        if peer.offences >= self.policy.ban_after:
            peer.ban_reason = reason
            peer.banned = True
            return True
        self._backoff(peer, now)
        return False

    def failed(self, session: Session, now: float) -> None:
        """The session's connection was refused, broke or timed out (not evicted): back off its peer."""
        self._backoff(session.peer, now)

    def _backoff(self, peer: PeerState, now: float) -> None:
        peer.failures += 1
        peer.next_try = now + self.policy.peer_backoff.delay(peer.failures, self.rng)

    def session_ended(self, session: Session) -> None:
        """The session's connection is closed: its requests in flight go back to the others."""
        peer = session.peer
        while session.outstanding:
            i = session.outstanding.popleft()
            peer.own.discard(i)
            self.blocks.release(i)
        peer.blocks += session.blocks
        peer.bytes += session.bytes
        peer.not_present += session.not_present
        peer.sessions -= 1
        if not peer.sessions:
            self._forget_map(peer)  # a peer we cannot ask holds nothing for us
            peer.offer_empty = None  # a new connection waits its turn afresh
        self.sessions.discard(session)
        self._queue_dirty = True  # this peer may be a candidate again

    # --- the passing of time ----------------------------------------------------------

    def tick(self, now: float) -> Tick:
        """Reconsider the block order and the slots."""
        order = self._update_mode()
        return Tick(self._evictee(now), order)

    def _update_mode(self) -> tuple[str, int] | None:
        """Random order over a window while two or more peers answer us, else file order.

        Counted are peers with a connection open that answered a request (a
        block or "not present"), not peers the tracker lists: finished
        fetchers stay listed long after they exit, and a fetch from one live
        seeder must not scatter its blocks (and leave the whole-file hash
        behind) because of them.
        """
        live = sum(1 for p in {s.peer for s in self.sessions} if p.answered and not p.banned)
        blocks = self.blocks
        sequential = live < 2
        if blocks.sequential == sequential:
            return None
        if not sequential:
            blocks.window_size = max(4 * self.max_depth, int(len(blocks.rest) * SWARM_WINDOW))
        blocks.sequential = sequential
        return ("file" if sequential else "random", live)

    def _evictee(self, now: float) -> Session | None:
        """A far-too-slow peer whose slot should go to an untried candidate (see pick_evictee)."""
        pol = self.policy
        if now - self.last_evict < pol.evict_every or self.free_slots() > 0:
            return None
        if not any(not p.connected_once and not p.failures for p in self.candidates(now)):
            return None
        victim = pick_evictee(self.sessions, now, pol, self.block_size)
        if victim is None:
            return None
        self.last_evict = now
        victim.evicted = True
        victim.peer.next_try = now + pol.evict_cooldown
        return victim

    def stall(self, now: float) -> str | None:
        """The error line when no block was verified for ``stall_timeout``; else None."""
        if now - self.last_progress <= self.policy.stall_timeout:
            return None
        t = f"{self.policy.stall_timeout:g} s"
        if self.list_error and not self.peers:
            return f"{self.list_error} (for {t})"
        usable = [p for p in self.peers.values() if not p.is_self]
        if not usable and not self.dead:
            return f"no peers for this file within {t}"
        if not self.ever_connected:
            return f"none of {len(usable) + len(self.dead)} peers could be reached within {t}"
        return banned_message(usable, t) or f"no block arrived for {t} from {len(usable)} known peers"
