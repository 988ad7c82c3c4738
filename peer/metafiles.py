"""Reading a metafile from disk: a ``.cascade`` or a collection, told apart by its magic.

Apart from :mod:`peer.collection_local` so that reading a single file's
``.cascade`` does not import the collection code: every fetcher of a swarm pays
for its imports at start-up, all of them at once on a small machine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from cascade.metafile import (
    MAX_COLLECTION_SIZE,
    MAX_METAFILE_SIZE,
    CascadeFile,
    looks_like_collection,
    parse_cascade,
    read_metafile_bytes,
)

if TYPE_CHECKING:
    from cascade.collection import Collection


def read_metafile(
    path: str | os.PathLike[str], *, keep_files: bool = False, source: str | None = None
) -> CascadeFile | Collection:
    """Read a ``.cascade`` or a collection file, told apart by its magic (never by its name).

    ``keep_files``: a collection's members keep their parsed ``.cascade`` (see
    :func:`cascade.collection.parse_collection`). ``source`` names the file in the
    messages about its content (default: ``path``; a download names its URL, not
    its temporary file). Raises :class:`MetafileError` (:class:`CollectionError`
    for a bad collection).
    """
    p = Path(path)
    shown = str(p) if source is None else source

    def limit(head: bytes) -> int:
        return MAX_COLLECTION_SIZE if looks_like_collection(head) else MAX_METAFILE_SIZE

    data = read_metafile_bytes(p, limit, ".cascade or collection")
    if looks_like_collection(data):
        from cascade.collection import parse_collection

        return parse_collection(data, shown, keep_files=keep_files)
    return parse_cascade(data, shown)
