"""Super-seeding for have maps: a complete peer offers each downloader different blocks.

A peer that holds the whole file and is asked for have maps by several
downloaders (docs/protocol-extensions.md) answers each with two bitmaps: what
it holds (everything) and what it *offers* that downloader: the blocks it has
sent least, split between the downloaders so that no two are steered to the
same one. Downloaders then ask it for blocks nobody else holds yet, and take
the rest from each other; the seeder's link carries each block about once.
This is the spirit of libtorrent's super-seeding, without its cost for old
clients: the offer only steers, every block held is still served to whoever
asks for it.

:func:`choose_offer` is the policy, pure (plain data in, a list out), so a
table tests it; :class:`SuperSeeder` keeps the state it needs for one file
under a lock, for the block server's worker threads.
"""

from __future__ import annotations

import math
import threading
from array import array
from collections.abc import Collection, Container, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SuperSeedPolicy:
    """When a complete peer super-seeds, and how many blocks it offers to whom."""

    # A downloader counts as an asker, and keeps its claims, while it asked for a map
    # or was sent a block this recently. Its map requests wait in its pipeline behind
    # the blocks it asked for first, seconds on a shared upload: well above that.
    claim_seconds: float = 10.0
    # Fewer downloaders asking for maps than this: no offers, the plain map only.
    min_askers: int = 1
    # An offer names at least this many blocks (arbitrary: enough to keep one pipeline busy) ...
    min_offer: int = 2
    # ... and at most what this downloader was sent in this many seconds (at its rate
    # since its last map): offers stay small and so disjoint, yet last until its next
    # map, which waits behind the blocks it asked for. Arbitrary: twice that wait.
    offer_seconds: float = 4.0
    # A block is not offered again while a send of it is under way, nor for this long
    # after the send completed (handed whole to the kernel): the last of it may still sit
    # in the socket's queue (about half a second on the emulated 40 Mbit/s links), then
    # its holder's next map must show it and the others ask for it. Arbitrary: a few map
    # refreshes. Counted from the queueing instead, a 1 MiB block that took 3.3 s to cross
    # a shared link was offered again before its first copy had landed.
    resend_after: float = 3.0
    # At most this many downloaders are being sent new blocks at once; the others are
    # offered nothing until one of them is done (first come, first served). Sixteen
    # streams sharing a 40 Mbit/s upload take 3.3 s each to land a 1 MiB block, and
    # the whole swarm waits for its first blocks that long (and for its last ones at
    # the end); four land one in 0.8 s, and the fetchers start passing blocks on.
    # Arbitrary: enough streams to keep the upload busy across the gaps between turns.
    max_streams: int = 4
    # While the upload has room to spare (its server looks), offer every block: the limits
    # above save a busy upload's bytes, and one that idles has bytes to spare.
    spare_upload: bool = True


def choose_offer(
    sent: Sequence[int],
    claims: Mapping[int, int],
    who: int,
    live: Container[int],
    share: int,
    recent: Container[int] = (),
    held: Container[int] = (),
) -> list[int]:
    """The ``share`` blocks to offer connection ``who``, in block order; maybe fewer, or none.

    ``claims`` maps a block to the connection it was offered to; a claim
    counts while its connection is in ``live``. Left out: blocks another live
    connection claims, blocks sent ``recent``-ly (their first copy is
    still spreading), and blocks ``who`` is thought to hold (``held``). Best
    first among the rest: the ones sent least (``sent[i]`` counts the sends of
    block ``i`` to downloaders that ask for maps), then the ones
    ``who`` already claims (an offer stays stable between refreshes), then the
    lowest block number (the downloader's whole-file hash follows the file
    order). An empty offer is fine: the other downloaders keep this peer's
    upload busy, and this one takes blocks from them.

    It visits only the blocks it may take, level by level of ``sent`` (C finds
    the next block of a level): ranking every block in Python took most of a
    seeder's CPU once a file had tens of thousands of blocks (BENCHMARKS.md).
    """
    if share <= 0 or not sent:
        return []
    index = sent.index if isinstance(sent, array | list) else list(sent).index
    count = len(sent)
    mine = sorted(i for i, owner in claims.items() if owner == who and 0 <= i < count)
    chosen: list[int] = []
    level = min(sent)
    while len(chosen) < share:
        # This level's blocks: first those ``who`` claims (a stable offer), then the others
        # in block order, leaving out what another live asker claims, or is recent or held.
        for i in mine:
            if sent[i] == level and i not in recent and i not in held:
                chosen.append(i)
                if len(chosen) == share:
                    return sorted(chosen)
        i = -1
        while True:
            try:
                i = index(level, i + 1)
            except ValueError:
                break
            owner = claims.get(i)
            if owner == who or (owner is not None and owner in live) or i in recent or i in held:
                continue
            chosen.append(i)
            if len(chosen) == share:
                return sorted(chosen)
        higher = [s for s in set(sent) if s > level]
        if not higher:
            break
        level = min(higher)
    return sorted(chosen)


def may_stream(who: int, streaming: Collection[int], waiting: Collection[int], max_streams: int) -> bool:
    """Whether connection ``who`` may start a turn of new blocks now.

    ``streaming`` holds the other connections in a turn (offered blocks not
    sent yet, or a block under way); ``waiting`` the connections refused a
    turn earlier. A waiting connection needs a free stream; any other
    needs one that no waiting connection is owed, so the connection whose turn
    just ended cannot take its stream straight back.
    """
    busy = len(streaming)
    if who in waiting:
        return busy < max_streams
    return busy + sum(1 for c in waiting if c != who) < max_streams


def equal_part(sent: Sequence[int], askers: int, policy: SuperSeedPolicy) -> int:
    """An equal part for each of ``askers`` downloaders of the least-sent blocks, at least ``min_offer``."""
    if not sent:
        return 0
    least = min(sent)
    level = sent.count(least) if isinstance(sent, array | list) else sum(1 for s in sent if s == least)
    return max(policy.min_offer, -(-level // max(askers, 1)))


def offer_share(sent: Sequence[int], askers: int, policy: SuperSeedPolicy, rate: float | None = None) -> int:
    """How many blocks one of ``askers`` downloaders is offered.

    Its :func:`equal_part`, but at most what ``rate`` (blocks per second sent
    to it lately; None: not known yet, ``min_offer``) takes in ``offer_seconds``.
    """
    cap = policy.min_offer if rate is None else max(policy.min_offer, math.ceil(rate * policy.offer_seconds))
    return min(equal_part(sent, askers, policy), cap)


class SuperSeeder:
    """The super-seeding state of one served file: sends per block, claims, who asks for maps.

    Thread-safe: the block server's workers call :meth:`sending` when a block's
    response is queued, :meth:`sent_block` when it was handed whole to the
    kernel (or :meth:`abandoned` when its connection closed first), and
    :meth:`offer` for every have-map request. A send counts when it completes:
    one cut short by a closed connection left no copy anywhere.
    """

    def __init__(self, block_count: int, policy: SuperSeedPolicy | None = None) -> None:
        self.policy = policy or SuperSeedPolicy()
        self.sent = array("I", bytes(4 * block_count))
        # Block -> when a send of it last completed, and to which connection (only those
        # within resend_after matter, and only while that connection is still an asker).
        self._last_sent: dict[int, tuple[float, int]] = {}
        # Connection -> the block it is being sent now (a connection sends one response at a
        # time; only the thread that owns it writes its entry).
        self._sending: dict[int, int] = {}
        # Block -> the connection it was last offered to.
        self._claims: dict[int, int] = {}
        # Connection -> when it last asked for a map or was sent a block.
        self._askers: dict[int, float] = {}
        # Connection -> (when its last offer was made, blocks sent to it since).
        self._since: dict[int, tuple[float, int]] = {}
        # Connection -> since when it waits for a turn (see may_stream); the connections in one.
        self._waiting: dict[int, float] = {}
        self._turns: set[int] = set()
        # Connection -> its last offer; and the blocks it is thought to hold: those of an
        # offer it asked for none of before its next map (see offer).
        self._offered: dict[int, list[int]] = {}
        self._held: dict[int, set[int]] = {}
        self._lock = threading.Lock()

    def sending(self, index: int, who: int, now: float) -> None:
        """A send of block ``index`` to connection ``who`` starts: no other downloader is offered it meanwhile.

        Unlocked, like :meth:`sent_block`: a dict store is atomic.
        """
        self._sending[who] = index
        if who in self._askers:
            self._askers[who] = now

    def abandoned(self, who: int) -> None:
        """The send under way to connection ``who`` will not complete (it closed): not counted."""
        self._sending.pop(who, None)

    def sent_block(self, index: int, who: int, now: float) -> None:
        """Count one completed send of block ``index`` to connection ``who``, if it is an asker (it stays one).

        Only sends to askers count: the offers steer downloaders that ask for maps, and
        they pass blocks on. A block sent to anyone else (a version-1 client, a probe
        that asked for one block and left) is not in that swarm: counted, it ranked
        behind every other block for good, and the whole loopback 1+8 swarm waited 4.5 s
        for the one block the bench's readiness probe had fetched.
        Unlocked: a lost increment only blurs the ranking, and a dict store is atomic.
        """
        self._sending.pop(who, None)
        if who in self._askers:
            sent = self.sent
            if sent[index] < 0xFFFFFFFF:
                sent[index] += 1
            self._last_sent[index] = (now, who)
            self._askers[who] = now
            since = self._since.get(who)
            if since is not None:
                self._since[who] = (since[0], since[1] + 1)

    def forget(self, who: int) -> None:
        """Connection ``who`` is closed: it is no asker any more, and its claims lapse at once."""
        self._askers.pop(who, None)
        self._since.pop(who, None)
        self._sending.pop(who, None)
        self._waiting.pop(who, None)
        self._turns.discard(who)
        self._offered.pop(who, None)
        self._held.pop(who, None)

    def offer(self, who: int, now: float, complete: bool, spare: bool = False) -> bytes | None:
        """The offer for connection ``who`` (one byte per block, 1 = offered), or None for "offer all held".

        None unless the file is ``complete`` and at least ``min_askers``
        connections are live askers (see ``claim_seconds``). With ``spare``
        (the upload has room to spare, the server says), every block to a
        downloader that takes what it is offered: it may ask for any, rarest first.
        """
        policy = self.policy
        with self._lock:
            askers = self._askers
            askers[who] = now
            horizon = now - policy.claim_seconds
            for conn, seen in list(askers.items()):
                if seen < horizon:
                    askers.pop(conn, None)
                    self._since.pop(conn, None)
                    self._waiting.pop(conn, None)
                    self._turns.discard(conn)
            if not complete or len(askers) < policy.min_askers:
                return None
            claims = self._claims
            since = self._since.get(who)
            took = since is not None and since[1] > 0
            if spare and (took or self._offered.get(who) == []):
                # The offers keep each block to about one copy because the upload is the swarm's
                # bottleneck. A seeder faster than its downloaders' uploads is not: they cannot
                # spread its blocks in time, and it idled at 30-40 % (BENCHMARKS.md). With upload
                # to spare, a downloader may ask for any block: to one that asked for blocks since
                # its last map, or was offered none (waiting for a turn); one that ignored its
                # offer holds what we would offer it. Out of turn, leaving no claims, and no offer
                # to infer held blocks from (it asks for only some of everything).
                self._since[who] = (now, 0)
                self._offered.pop(who, None)
                self._turns.discard(who)
                for i, owner in list(claims.items()):
                    if owner == who:
                        del claims[i]
                return b"\x01" * len(self.sent)
            for i, owner in list(claims.items()):
                if owner not in askers:
                    del claims[i]
            # A block sent lately is still spreading only while its receiver is here to pass it
            # on: one sent to a downloader that has since closed (a finished fetch, say) is
            # offered again at once, or the next downloader would wait out resend_after for it.
            recent_horizon = now - policy.resend_after
            recent = set(self._sending.values())
            for i, (t, to) in list(self._last_sent.items()):
                if t < recent_horizon:
                    del self._last_sent[i]
                elif to in askers:
                    recent.add(i)
            rate = None if since is None or now <= since[0] else since[1] / (now - since[0])
            self._since[who] = (now, 0)
            # Its block requests reach us before its next map request (one connection, in
            # order): a downloader that asked for none of its offered blocks before asking
            # for a map again, with nothing under way to it, got them from the others (this
            # peer sees only its own sends). Offering them again would stall it: it waits
            # for an offer it can use before asking around it.
            last = self._offered.get(who)
            if last and since is not None and not since[1] and who not in self._sending:
                self._held.setdefault(who, set()).update(last)
            held = self._held.get(who, ())
            sent = self.sent
            part = equal_part(sent, len(askers), policy)
            # A lone downloader has nobody to be kept apart from: no cap, except on its first
            # offer (rate not known): the rest of a swarm arrives a moment later, and a big
            # first offer would steer it into their blocks until its next map.
            alone = len(askers) == 1 and rate is not None
            share = part if alone else offer_share(sent, len(askers), policy, rate)
            _trim_claims(claims, part)
            # In a turn: offered blocks not sent yet, or one under way (a send to a connection
            # that was refused a turn, asking for blocks it was not offered, does not count).
            # A turn ends at the connection's next map: with others waiting, it passes on (a
            # turn kept until its offered blocks were sent would never end for a downloader
            # that got them elsewhere).
            turns = self._turns
            streaming = {c for i, c in claims.items() if c != who and not sent[i]}
            streaming.update(c for c in list(self._sending) if c != who and c in turns)
            if may_stream(who, streaming, self._waiting, policy.max_streams):
                self._waiting.pop(who, None)
                turns.add(who)
            else:
                self._waiting.setdefault(who, now)
                turns.discard(who)
                share = 0
            chosen = choose_offer(sent, claims, who, askers, share, recent, held)
            if not chosen and held and share:
                # Everything left is thought held: a guess, which must never leave it with an
                # empty offer (it would wait for ever for a block it got no copy of after all).
                chosen = choose_offer(sent, claims, who, askers, share, recent)
            self._offered[who] = chosen
            keep = set(chosen)
            for i, owner in list(claims.items()):
                if owner == who and i not in keep:
                    del claims[i]  # let go of what this connection is no longer offered
            flags = bytearray(len(sent))
            for i in chosen:
                flags[i] = 1
                claims.setdefault(i, who)
            return bytes(flags)


def _trim_claims(claims: dict[int, int], share: int) -> None:
    """Cut every connection's claims down to ``share``, the equal part (its lowest blocks kept).

    When a downloader arrives, the shares shrink; without this the earlier
    askers would hold their bigger shares until their next refresh, and the
    newcomer would be offered what they claim.
    """
    owned: dict[int, list[int]] = {}
    for i, owner in claims.items():
        owned.setdefault(owner, []).append(i)
    for blocks in owned.values():
        if len(blocks) > share:
            for i in sorted(blocks)[share:]:
                del claims[i]
