"""tus `concatenation` (SPEC: Long fat links): one file sent as several partial uploads
at once (tus-js-client's and Uppy's `parallelUploads`), then joined by a final request.

A partial upload is an upload of its own (`Upload.partial_of` names its ticket): its
bytes arrive, are synced and acknowledged, survive restarts and expire like any
upload's, but are never handed over. The final request lists partial uploads of one
ticket; `tus.Concatenation` connects to the ticket's upload as its transport and
has their bytes copied into its file in that order, by the kernel (`files.Spliced`),
where the file system may share the blocks instead. The handover and its SHA-256
are the whole file's (only its file is hashed: a partial's bytes are not). The
partials are held meanwhile (no PATCH, no DELETE), and go once their bytes are durable
in the ticket's file, after the answer; a final request cut short (a
restart, a full disk) is sent again and carries on from the bytes already durable.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from .errors import UploadError, clipped
from .files import Digest
from .upload import CONCAT, Ending, Upload

MAX_PARTS = 1000  # partial uploads of a ticket under way, and one final request may list
PARTIAL_ID = re.compile(r"/tus/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})/?$")
PARTIAL = "partial"


class ConcatError(Exception):
    def __init__(self, status: int, text: str) -> None:
        super().__init__(text)
        self.status = status


def requested(header: str | None) -> str | list[str] | None:
    """`Upload-Concat`: None (absent), `PARTIAL`, or the upload ids a final one lists."""
    if header is None:
        return None
    header = header.strip()
    if header == PARTIAL:
        return PARTIAL
    kind, _, urls = header.partition(";")
    if kind.strip() != "final":
        raise ConcatError(400, "Upload-Concat must be `partial` or `final;` and URLs")
    ids = []
    for url in urls.split():
        match = PARTIAL_ID.search(urlsplit(url).path)
        if match is None:
            raise ConcatError(400, f"Upload-Concat: {clipped(url)!r} is not an upload's URL here")
        ids.append(match.group(1))
    if not ids:
        raise ConcatError(400, "Upload-Concat: final lists no partial upload")
    if len(ids) > MAX_PARTS:
        raise ConcatError(400, f"Upload-Concat: more than {MAX_PARTS} partial uploads")
    if len(set(ids)) != len(ids):
        raise ConcatError(400, "Upload-Concat: a partial upload is listed twice")
    return ids


def check_parts(parts: list[Upload | None], ids: list[str], ticket: str) -> str:
    """The ticket the listed partial uploads all belong to (and `ticket`, if given);
    ConcatError if one is unknown, not a partial, ended or not complete."""
    owners = set()
    for upload_id, part in zip(ids, parts, strict=True):
        if part is None:
            raise ConcatError(404, f"partial upload {upload_id}: no such upload")
        if not part.partial_of:
            raise ConcatError(400, f"upload {upload_id} is not a partial upload")
        if ticket and part.partial_of != ticket:
            raise ConcatError(403, f"partial upload {upload_id} belongs to another ticket")
        if not part.receiving:
            raise ConcatError(410, f"partial upload {upload_id} is gone: {part.cancel_reason}")
        if part.offset != part.length:
            raise ConcatError(
                409, f"partial upload {upload_id} has {part.offset} of {part.length} bytes stored"
            )
        owners.add(part.partial_of)
    if len(owners) != 1:
        raise ConcatError(403, "the partial uploads belong to different tickets")
    return owners.pop()


class Held:
    """A partial upload's transport while its bytes are being copied: nobody else
    writes or deletes it meanwhile."""

    via = CONCAT
    joins = False
    digests: tuple[Digest, ...] = ()
    holding = may_void = False

    def written(self, size: int) -> None: ...

    def stored(self, size: int) -> None: ...

    def failed(self, error: UploadError) -> None: ...

    def ended(self, ending: Ending) -> None: ...

    def waiting(self) -> None: ...

    def pending(self) -> None: ...

    def going_away(self) -> None: ...
