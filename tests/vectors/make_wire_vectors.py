"""Golden frames of the chunk-transfer protocol: every request and reply type, and every error code.

Run from the repository root: ``python -m tests.vectors.make_wire_vectors`` rewrites wire_v2.json.
Nothing here is random: ids and bodies are fixed bytes, so the file only changes when the wire does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from p2pmega.core.chunking import ChunkId, chunk_id_of
from p2pmega.core.wire import (
    MAX_LEASE_S,
    PROTOCOL_VERSION,
    ChunkData,
    Error,
    ErrorCode,
    ExpectRequest,
    FetchRequest,
    ForwardedStoreRequest,
    ForwardOK,
    ForwardStoreRequest,
    HasReply,
    HasRequest,
    KeyedStoreRequest,
    LeasesReply,
    LeasesRequest,
    RenewReply,
    RenewRequest,
    RenewSignedRequest,
    Role,
    SpaceReply,
    SpaceRequest,
    StoreOK,
    StoreRequest,
    TransferConnection,
)

VECTORS = Path(__file__).with_name("wire_v2.json")
BODY = bytes(range(256)) * 3  # a small stored chunk; the wire does not care about its size
CID = chunk_id_of(BODY)


def _ids(count: int) -> tuple[ChunkId, ...]:
    return tuple(ChunkId(i.to_bytes(4, "big") * 8) for i in range(count))


def exchanges() -> list[tuple[str, Any, Any]]:
    """(name, request, reply) for every message type, edge cases and every error code."""
    cases: list[tuple[str, Any, Any]] = [
        ("store", StoreRequest(1, CID, 3600, BODY), StoreOK(1, True)),
        ("store-already-held", StoreRequest(2, CID, MAX_LEASE_S, BODY), StoreOK(2, False)),
        ("fetch", FetchRequest(3, CID), ChunkData(3, CID, BODY)),
        ("has", HasRequest(4, _ids(3)), HasReply(4, (True, False, True))),
        # 17 ids: the reply's flags cross a byte boundary. (A batch holds 1 to MAX_BATCH_IDS ids; the
        # largest is left out to keep this file small, test_wire.py covers it.)
        ("has-17", HasRequest(6, _ids(17)), HasReply(6, tuple(i % 3 == 0 for i in range(17)))),
        ("renew", RenewRequest(7, _ids(2), 86400), RenewReply(7, (False, True))),
    ]
    # The codes of the first release; later ones are appended below.
    for code in (c for c in ErrorCode if c <= ErrorCode.INTERNAL):
        rid = 100 + int(code)
        cases.append((f"error-{code.name.lower()}", FetchRequest(rid, CID), Error(rid, code, "")))
    cases.append(
        (
            "error-with-message",
            FetchRequest(0x7FFFFFFF, CID),
            Error(0x7FFFFFFF, ErrorCode.NOT_FOUND, "no"),
        )
    )
    # Added after the first release of version 1: appended, so every earlier frame stays as it was.
    cases.append(
        ("leases", LeasesRequest(9, _ids(3)), LeasesReply(9, (0, 3600, MAX_LEASE_S))),
    )
    # Storage limits and renewal capabilities (issue 16): two new requests and three new codes.
    renew_key = bytes(range(32))
    cases.append(
        (
            "store-keyed",
            KeyedStoreRequest(10, CID, 3600, BODY, renew_key=renew_key),
            StoreOK(10, True),
        )
    )
    cases.append(
        (
            "renew-signed",
            RenewSignedRequest(11, _ids(2), 1_800_000_000, renew_key, bytes(range(64))),
            RenewReply(11, (True, False)),
        )
    )
    for code in (c for c in ErrorCode if ErrorCode.INTERNAL < c <= ErrorCode.BAD_RENEWAL):
        rid = 100 + int(code)
        cases.append((f"error-{code.name.lower()}", FetchRequest(rid, CID), Error(rid, code, "")))
    # Free space for placement by capacity (issue 18): one new request, answered by its own reply.
    cases.append(("space", SpaceRequest(12), SpaceReply(12, 2_500_000_000, 10_000_000_000)))
    cases.append(("space-full", SpaceRequest(13), SpaceReply(13, 0, 2**64 - 1)))
    # Pipelined replication (issue 20): three requests, one new reply, one new code.
    cases.append(
        (
            "store-forward",
            ForwardStoreRequest(
                14,
                CID,
                3600,
                BODY,
                renew_key=renew_key,
                target_id=bytes(range(100, 120)),
                target_host="127.3.2.1",
                target_port=4242,
            ),
            ForwardOK(14, True, True),
        )
    )
    cases.append(
        (
            "store-forward-ipv6-not-forwarding",
            ForwardStoreRequest(
                15,
                CID,
                60,
                BODY,
                renew_key=renew_key,
                target_id=bytes(20),
                target_host="2001:db8::7",
                target_port=65535,
            ),
            ForwardOK(15, False, False),
        )
    )
    cases.append(
        ("expect", ExpectRequest(16, _ids(2), 3600, renew_key), RenewReply(16, (True, False)))
    )
    cases.append(("forwarded-store", ForwardedStoreRequest(17, CID, 3600, BODY), StoreOK(17, True)))
    for code in (c for c in ErrorCode if c > ErrorCode.BAD_RENEWAL):
        rid = 100 + int(code)
        cases.append((f"error-{code.name.lower()}", FetchRequest(rid, CID), Error(rid, code, "")))
    return cases


def describe(event: Any) -> dict[str, Any]:
    """An event as JSON: its type name and fields (bytes as hex, ids as hex, flags as lists)."""
    doc: dict[str, Any] = {"type": type(event).__name__}
    for name, value in vars(event).items():
        if isinstance(value, bytes | memoryview):
            doc[name] = bytes(value).hex()
        elif isinstance(value, tuple):
            doc[name] = [v.hex() if isinstance(v, bytes) else v for v in value]
        elif isinstance(value, ErrorCode):
            doc[name] = value.name
        else:
            doc[name] = value
    return doc


def frames() -> dict[str, Any]:
    client = TransferConnection(role=Role.CLIENT)
    server = TransferConnection(role=Role.SERVER)
    out = []
    for name, request, reply in exchanges():
        request_frame = b"".join(bytes(b) for b in client.send(request))
        server.receive_data(request_frame)
        server.next_event()
        reply_frame = b"".join(bytes(b) for b in server.send(reply))
        client.receive_data(reply_frame)
        client.next_event()
        out.append(
            {
                "name": name,
                "request": describe(request),
                "request_frame": request_frame.hex(),
                "reply": describe(reply),
                "reply_frame": reply_frame.hex(),
            }
        )
    return {"protocol_version": PROTOCOL_VERSION, "exchanges": out}


def main() -> None:
    VECTORS.write_text(json.dumps(frames(), indent=1) + "\n", "utf-8")


if __name__ == "__main__":
    main()
