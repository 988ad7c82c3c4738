"""The HTTP client of a peer and of ``cascade publish``: sessions, errors, ``.cascade`` up and down.

:mod:`peer.publish_command` (``cascade publish``) uploads with
:func:`upload_cascade`; ``peer fetch URL`` downloads with :func:`download_cascade`;
:mod:`peer.http_tracker` announces with :func:`http_session`, :func:`parse_json`
and :func:`error_message`.

A tracker started with ``--http-port`` stores uploaded files under their
cascade hash and serves them at ``http://HOST:PORT/cascades/HASH.cascade``.
Since the hash is the SHA-256 of the file's bytes, such a URL names exactly
one file: :func:`download_cascade` checks the bytes against the hash in the
URL before anything else sees them.

``requests`` is imported inside the functions that need it, so the commands
that never speak HTTP start without it. Every HTTP call has a timeout and a
bounded retry policy (:func:`http_session`); every failure becomes one
:class:`~cascade.errors.CascadeError` with a one-line message.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import SplitResult, unquote, urlsplit

from cascade.backoff import Backoff
from cascade.collection import MAX_COLLECTION_SIZE, Collection, serialize_collection
from cascade.errors import (
    DataError,
    MetafileError,
    ProtocolError,
    PublishRefused,
    UnreachableError,
    UsageError,
    from_os_error,
)
from cascade.metafile import MAX_METAFILE_SIZE, CascadeFile
from cascade.wire import parse_hex_hash
from peer.metafiles import read_metafile

if TYPE_CHECKING:
    import requests

# Seconds to wait for a connection, and for each read of an answer.
CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0
# Retries of one HTTP call on connection errors and 502/503/504 (never on a 4xx).
RETRIES = 2
# urllib3 retries the first time at once, then after 0.2 s, doubling (its factor is fixed at 2);
# the cap is urllib3's default, 120 s.
HTTP_BACKOFF = Backoff(initial=0.2, factor=2.0, cap=120.0)

_CASCADE_PATH = re.compile(r"^(.*)/cascades/([0-9a-fA-F]{64})\.cascade$")


@dataclass(frozen=True, slots=True)
class Published:
    """The answer to an upload."""

    cascade_hash: bytes  # a collection's: its collection hash
    url: str  # where others download it
    new: bool  # False when the tracker already had this file
    collection: bool = False  # a collection rather than a single-file .cascade


def http_session(retries: int = RETRIES) -> requests.Session:
    """A ``requests`` session that retries connection errors and 502/503/504 a bounded number of times.

    It ignores proxy variables and ``.netrc`` from the environment: a tracker
    is addressed directly and is never sent credentials it was not given.
    """
    import requests
    from requests.adapters import HTTPAdapter
    from urllib3.util.retry import Retry

    # urllib3 logs a "Retrying (Retry(total=...))" warning for every retry; the
    # caller reports the final outcome in one line, so those would be noise.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    retry = Retry(
        total=retries,
        connect=retries,
        read=1,
        status=retries,
        backoff_factor=HTTP_BACKOFF.initial,
        backoff_max=HTTP_BACKOFF.cap,
        status_forcelist=(502, 503, 504),
        # An announce or an upload of the same bytes may safely be repeated.
        allowed_methods=frozenset({"GET", "HEAD", "PUT", "POST"}),
        raise_on_status=False,
        respect_retry_after_header=False,  # a server must not make us wait as long as it likes
    )
    session = requests.Session()
    session.trust_env = False
    adapter = HTTPAdapter(max_retries=retry)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def describe_request_error(exc: Exception) -> str:
    """A short reason for a ``requests`` exception ("Connection refused", "timed out")."""
    import requests

    if isinstance(exc, requests.Timeout):
        return "timed out"
    if _binary_reply(exc):
        return "the answer is not HTTP: this looks like the tracker's binary port; use HOST:PORT without http://"
    text = str(exc)
    m = re.search(r"\[Errno -?\d+\] ([^'\"\)]+)", text)
    if m:
        return m.group(1).strip()
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _binary_reply(exc: BaseException) -> bool:
    """True if ``exc`` (from ``requests``) comes from a status line that starts with a control byte.

    A binary tracker answers an HTTP request with an error reply whose first
    byte is its status (1..255), so ``http.client`` meets no ``HTTP/`` line.
    """
    from http.client import BadStatusLine

    seen: list[BaseException] = [exc]
    for e in seen:  # the chain is short; the bound guards against a cycle
        if len(seen) > 20:
            break
        if isinstance(e, BadStatusLine):
            line = str(e.args[0]) if e.args else ""
            return bool(line) and not line[0].isprintable()
        nested = [e.__cause__, e.__context__, getattr(e, "reason", None), *e.args]
        seen.extend(x for x in nested if isinstance(x, BaseException) and x not in seen)
    return False


def parse_json(body: bytes) -> object:
    """``body`` as JSON; raises :class:`ProtocolError` for anything a server can send that is not JSON.

    A nesting deep enough to exhaust the parser's stack counts as not JSON.
    """
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)[:100]
        raise ProtocolError(f"the reply is not valid JSON ({reason})") from exc


def error_message(response: requests.Response) -> str:
    """The ``{"error": ...}`` of an error response, else its status line."""
    try:
        doc = parse_json(response.content)
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return str(doc["error"])[:300]
    except ProtocolError:
        pass
    return f"{response.status_code} {response.reason}"


def is_url(text: str) -> bool:
    return text.startswith(("http://", "https://"))


def _split(text: str, what: str) -> SplitResult:
    """``urlsplit``, with its ValueError (an unclosed ``[``, a netloc that NFKC changes) as :class:`UsageError`."""
    try:
        return urlsplit(text.strip())
    except ValueError as exc:
        raise UsageError(f"invalid {what} {text!r}: {exc}") from exc


def tracker_base_url(text: str, what: str = "tracker URL") -> str:
    """``http://HOST:PORT`` (optionally with a path prefix), without a trailing slash.

    Raises :class:`UsageError` for anything else.
    """
    parts = _split(text, what)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"invalid {what} {text!r}: expected http://HOST:PORT")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise UsageError(f"invalid {what} {text!r}: the port must be a number from 0 to 65535") from None
    if parts.query or parts.fragment:
        raise UsageError(f"invalid {what} {text!r}: no query or fragment expected")
    return f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"


def split_cascade_url(url: str) -> tuple[str, bytes]:
    """``http://H:P/cascades/HASH.cascade`` -> (``http://H:P``, HASH as bytes); raises :class:`UsageError`."""
    parts = _split(url, ".cascade URL")
    m = _CASCADE_PATH.match(parts.path)
    if parts.scheme not in ("http", "https") or not parts.hostname or not m:
        raise UsageError(f"invalid .cascade URL {url!r}: expected http://HOST:PORT/cascades/HASH.cascade")
    return tracker_base_url(f"{parts.scheme}://{parts.netloc}{m.group(1)}", "URL"), parse_hex_hash(m.group(2))


def safe_file_name(name: str | None) -> str | None:
    """``name`` if it is a plain, visible file name; ``None`` otherwise (a server's text is not trusted)."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or len(name.encode()) > 200:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        return None
    return name


# --- download -------------------------------------------------------------------


def download_cascade(url: str, out: str | os.PathLike[str] | None = None, folder: str = ".") -> tuple[Path, str]:
    """Download the ``.cascade`` at ``url``, check its SHA-256 against the URL, save it.

    It is saved as ``OUT.cascade`` beside ``out`` (the data path) when given,
    else in ``folder`` as ``NAME.cascade``, NAME being the data file name the
    tracker knows, or the hash in hex. Returns (the saved path, the tracker's
    base URL). A file already there with the same bytes is kept; one with
    other bytes is an error. Raises :class:`UsageError`,
    :class:`UnreachableError`, :class:`PublishRefused` and :class:`MetafileError`.
    """
    import requests

    base, want = split_cascade_url(url)
    try:
        with http_session() as session, session.get(url, timeout=(CONNECT_TIMEOUT, READ_TIMEOUT), stream=True) as r:
            if r.status_code != 200:
                raise PublishRefused(f"{url}: {error_message(r)}")
            name = safe_file_name(unquote(r.headers.get("X-Cascade-Name", "")))
            if out is not None:
                target = Path(os.fspath(out) + ".cascade")
            else:
                target = Path(folder) / f"{name or want.hex()}.cascade"
            tmp = _receive(r, url, target)
    except requests.RequestException as exc:
        raise UnreachableError(f"{url}: cannot download: {describe_request_error(exc)}") from exc
    try:
        _check_and_place(tmp, target, want, url)
    finally:
        tmp.unlink(missing_ok=True)
    return target, base


# A download by URL may be a .cascade (at most 512 MiB) or a collection (at most 1 GiB): the
# larger bound here, and the right one by its magic once it is whole (read_metafile).
MAX_DOWNLOAD_SIZE = max(MAX_METAFILE_SIZE, MAX_COLLECTION_SIZE)


def _receive(r: requests.Response, url: str, target: Path) -> Path:
    length = r.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > MAX_DOWNLOAD_SIZE:
        raise MetafileError(f"{url}: {length} bytes is larger than any valid .cascade or collection file")
    if target.parent and not target.parent.is_dir():
        raise UsageError(f"{target.parent}: no such folder for the downloaded .cascade file")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    except OSError as exc:
        raise _save_error(target, exc) from exc
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            size = 0
            for chunk in r.iter_content(1 << 16):
                size += len(chunk)
                if size > MAX_DOWNLOAD_SIZE:
                    raise MetafileError(f"{url}: larger than any valid .cascade or collection file")
                f.write(chunk)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise _save_error(target, exc) from exc
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _save_error(target: Path, exc: OSError) -> DataError:
    """One line for a failure to save the downloaded .cascade as ``target``."""
    return from_os_error(exc, target, "save the downloaded .cascade file")


def _sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.digest()


def _check_and_place(tmp: Path, target: Path, want: bytes, url: str) -> None:
    got = _sha256(tmp)
    if got != want:
        raise MetafileError(
            f"{url}: the downloaded file's SHA-256 is {got.hex()}, not the hash in the URL; refusing to use it"
        )
    # The right bytes, and also a valid .cascade or collection (named by its URL: the temporary file goes).
    read_metafile(tmp, source=url)
    try:
        os.chmod(tmp, 0o644)  # mkstemp made it private; a .cascade file is public by nature
        if target.exists():
            if target.is_file() and _sha256(target) == want:
                return
            raise UsageError(f"{target} already exists and is not this .cascade file; use --out to save it elsewhere")
        os.replace(tmp, target)
    except OSError as exc:
        raise _save_error(target, exc) from exc


# --- upload ---------------------------------------------------------------------


def upload_cascade(path: str | os.PathLike[str], tracker: str, token: str | None, name: str | None) -> Published:
    """Upload one ``.cascade`` to the tracker at ``tracker`` (``http://HOST:PORT``).

    Raises :class:`MetafileError` for a bad file, :class:`UnreachableError`
    and :class:`PublishRefused`.
    """
    import requests

    read = read_metafile(path)
    if isinstance(read, CascadeFile):
        raw, cascade_hash = read.raw, read.cascade_hash
    else:
        # Encoding is canonical: these are the very bytes that were read and parsed.
        raw, cascade_hash = serialize_collection(read.members), read.collection_hash
    base = tracker_base_url(tracker)
    headers = {"Content-Type": "application/octet-stream"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    params = {"name": name} if name else None
    try:
        with http_session() as session:
            r = session.put(
                f"{base}/api/v1/cascades",
                data=raw,
                params=params,
                headers=headers,
                timeout=(CONNECT_TIMEOUT, READ_TIMEOUT),
            )
    except requests.RequestException as exc:
        raise UnreachableError(f"tracker {base} unreachable: {describe_request_error(exc)}") from exc
    if r.status_code not in (200, 201):
        raise PublishRefused(f"tracker {base} refused the upload: {error_message(r)}")
    try:
        doc = parse_json(r.content)
        if not isinstance(doc, dict):
            raise TypeError("not a JSON object")
        returned = parse_hex_hash(doc["cascade_hash"])
    except (ProtocolError, ValueError, KeyError, TypeError) as exc:
        raise PublishRefused(f"tracker {base} answered the upload with something that is not its API") from exc
    if returned != cascade_hash:
        raise PublishRefused(f"tracker {base} stored the file under another hash ({returned.hex()})")
    url = f"{base}/cascades/{cascade_hash.hex()}.cascade"
    return Published(cascade_hash, url, r.status_code == 201, isinstance(read, Collection))
