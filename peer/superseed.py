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

import threading
from array import array
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class SuperSeedPolicy:
    """When a complete peer super-seeds, and how long a downloader keeps the blocks offered to it."""

    # A downloader counts as an asker, and keeps its claims, while it asked for a map
    # or was sent a block this recently. Its map requests wait in its pipeline behind
    # the blocks it asked for first, seconds on a shared upload: well above that.
    claim_seconds: float = 10.0
    # Fewer downloaders asking for maps than this: no offers, the plain map only.
    min_askers: int = 2
    # An offer names at least this many blocks (arbitrary: enough to keep one pipeline busy).
    min_offer: int = 2


def choose_offer(
    sent: Sequence[int], claims: Mapping[int, int], who: int, live: Container[int], share: int
) -> list[int]:
    """The ``share`` blocks to offer connection ``who``, in block order.

    ``claims`` maps a block to the connection it was offered to; a claim
    counts while its connection is in ``live``. Best first: blocks no other
    live connection claims, then the ones sent least (``sent[i]`` counts the
    sends of block ``i`` to anyone), then the ones ``who`` already claims (an
    offer stays stable between refreshes), then the lowest block number (the
    downloader's whole-file hash follows the file order). Blocks claimed by
    others are offered only when no other block is left, so an offer is never
    empty while the file has blocks: a downloader is never left idle.
    """
    if share <= 0:
        return []
    ranks = []
    for i in range(len(sent)):
        owner = claims.get(i)
        taken = owner is not None and owner != who and owner in live
        ranks.append((taken, sent[i], owner != who, i))
    ranks.sort()
    free = [r[-1] for r in ranks if not r[0]]
    return sorted((free or [r[-1] for r in ranks])[:share])


def offer_share(sent: Sequence[int], askers: int, policy: SuperSeedPolicy) -> int:
    """How many blocks one of ``askers`` downloaders is offered: an equal part of the least-sent blocks."""
    if not sent:
        return 0
    least = min(sent)
    level = sent.count(least) if isinstance(sent, array | list) else sum(1 for s in sent if s == least)
    return max(policy.min_offer, -(-level // max(askers, 1)))


class SuperSeeder:
    """The super-seeding state of one served file: sends per block, claims, who asks for maps.

    Thread-safe: the block server's workers call :meth:`sent_block` for every
    block sent and :meth:`offer` for every have-map request.
    """

    def __init__(self, block_count: int, policy: SuperSeedPolicy | None = None) -> None:
        self.policy = policy or SuperSeedPolicy()
        self.sent = array("I", bytes(4 * block_count))
        # Block -> the connection it was last offered to.
        self._claims: dict[int, int] = {}
        # Connection -> when it last asked for a map or was sent a block.
        self._askers: dict[int, float] = {}
        self._lock = threading.Lock()

    def sent_block(self, index: int, who: int, now: float) -> None:
        """Count one send of block ``index``, to connection ``who`` (which stays an asker, if it is one).

        Unlocked: a lost increment only blurs the ranking, and a dict store is atomic.
        """
        sent = self.sent
        if sent[index] < 0xFFFFFFFF:
            sent[index] += 1
        if who in self._askers:
            self._askers[who] = now

    def forget(self, who: int) -> None:
        """Connection ``who`` is closed: it is no asker any more, and its claims lapse at once."""
        self._askers.pop(who, None)

    def offer(self, who: int, now: float, complete: bool) -> bytes | None:
        """The offer for connection ``who`` (one byte per block, 1 = offered), or None for "offer all held".

        None unless the file is ``complete`` and at least ``min_askers``
        connections are live askers (see ``claim_seconds``).
        """
        policy = self.policy
        with self._lock:
            askers = self._askers
            askers[who] = now
            horizon = now - policy.claim_seconds
            for conn, seen in list(askers.items()):
                if seen < horizon:
                    askers.pop(conn, None)
            if not complete or len(askers) < policy.min_askers:
                return None
            claims = self._claims
            for i, owner in list(claims.items()):
                if owner not in askers:
                    del claims[i]
            sent = self.sent
            share = offer_share(sent, len(askers), policy)
            _trim_claims(claims, share)
            chosen = choose_offer(sent, claims, who, askers, share)
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
    """Cut every connection's claims down to ``share`` (its lowest blocks kept).

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
