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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# (connection id, claimed until) for a block offered to one downloader.
Claim = tuple[int, float]


@dataclass(frozen=True, slots=True)
class SuperSeedPolicy:
    """When a complete peer super-seeds, and how long an offer holds a block for one downloader."""

    # A downloader counts (and keeps its claims) while it asked for a map this
    # recently. Our fetcher asks every ~0.5 s; twice that plus slack.
    claim_seconds: float = 1.5
    # Fewer downloaders asking for maps than this: no offers, the plain map only.
    min_askers: int = 2
    # An offer names at least this many blocks (arbitrary: enough to keep one pipeline busy).
    min_offer: int = 2


def choose_offer(sent: Sequence[int], claims: Mapping[int, Claim], who: int, now: float, share: int) -> list[int]:
    """The ``share`` blocks to offer connection ``who``, in block order.

    Best first: blocks no other connection has a live claim on, then the ones
    sent least (``sent[i]`` counts the sends of block ``i`` to anyone), then
    the ones ``who`` already claims (an offer stays stable between refreshes),
    then the lowest block number (the downloader's whole-file hash follows
    the file order). Blocks claimed by others are offered only when no other
    block is left, so an offer is never empty while the file has blocks: a
    downloader is never left idle.
    """

    def rank(i: int) -> tuple[bool, int, bool, int]:
        claim = claims.get(i)
        live = claim is not None and claim[1] > now
        taken = live and claim is not None and claim[0] != who
        mine = live and not taken
        return (taken, sent[i], not mine, i)

    if share <= 0:
        return []
    ranked = sorted(range(len(sent)), key=rank)
    free = [i for i in ranked if not rank(i)[0]]
    return sorted((free or ranked)[:share])


def offer_share(sent: Sequence[int], askers: int, policy: SuperSeedPolicy) -> int:
    """How many blocks one of ``askers`` downloaders is offered: an equal part of the least-sent blocks."""
    if not sent:
        return 0
    least = min(sent)
    level = sum(1 for s in sent if s == least) if not isinstance(sent, array) else sent.count(least)
    return max(policy.min_offer, -(-level // max(askers, 1)))


class SuperSeeder:
    """The super-seeding state of one served file: sends per block, live claims, who asks for maps.

    Thread-safe: the block server's workers call :meth:`sent_block` for every
    block sent and :meth:`offer` for every have-map request.
    """

    def __init__(self, block_count: int, policy: SuperSeedPolicy | None = None) -> None:
        self.policy = policy or SuperSeedPolicy()
        self.sent = array("I", bytes(4 * block_count))
        self._claims: dict[int, Claim] = {}
        self._askers: dict[int, float] = {}
        self._lock = threading.Lock()

    def sent_block(self, index: int) -> None:
        """Count one send of block ``index`` (unlocked: a lost increment only blurs the ranking)."""
        sent = self.sent
        if sent[index] < 0xFFFFFFFF:
            sent[index] += 1

    def offer(self, who: int, now: float, complete: bool) -> bytes | None:
        """The offer for connection ``who`` (one byte per block, 1 = offered), or None for "offer all held".

        None unless the file is ``complete`` and at least ``min_askers``
        connections asked for maps within ``claim_seconds``.
        """
        policy = self.policy
        with self._lock:
            self._askers[who] = now
            horizon = now - policy.claim_seconds
            for conn, seen in list(self._askers.items()):
                if seen < horizon:
                    del self._askers[conn]
            if not complete or len(self._askers) < policy.min_askers:
                return None
            claims = self._claims
            for i, (_owner, until) in list(claims.items()):
                if until <= now:
                    del claims[i]
            sent = self.sent
            share = offer_share(sent, len(self._askers), policy)
            _trim_claims(claims, share)
            chosen = choose_offer(sent, claims, who, now, share)
            keep = set(chosen)
            for i, (owner, _until) in list(claims.items()):
                if owner == who and i not in keep:
                    del claims[i]  # let go of what this connection is no longer offered
            flags = bytearray(len(sent))
            until = now + policy.claim_seconds
            for i in chosen:
                flags[i] = 1
                if claims.get(i, (who, 0.0))[0] == who:
                    claims[i] = (who, until)
            return bytes(flags)


def _trim_claims(claims: dict[int, Claim], share: int) -> None:
    """Cut every connection's claims down to ``share`` (its lowest blocks kept).

    When a downloader arrives, the shares shrink; without this the earlier
    askers would hold their bigger shares until their next refresh, and the
    newcomer would be offered what they claim.
    """
    owned: dict[int, list[int]] = {}
    for i, (owner, _until) in claims.items():
        owned.setdefault(owner, []).append(i)
    for blocks in owned.values():
        if len(blocks) > share:
            for i in sorted(blocks)[share:]:
                del claims[i]
