"""net.wire_errors: the one table between store exceptions, wire error codes and client exceptions."""

from __future__ import annotations

import pytest

from p2pmega import errors
from p2pmega.core.chunking import chunk_id_of
from p2pmega.core.wire import Error, ErrorCode, FetchRequest, StoreRequest
from p2pmega.net.wire_errors import EXCEPTION_OF, error_reply, raise_for

CID = chunk_id_of(b"x")
STORE = StoreRequest(3, CID, 60, b"x")
FETCH = FetchRequest(4, CID)
ADDR = ("127.0.0.1", 9)


@pytest.mark.parametrize(
    ("request_", "exc", "code"),
    [
        (FETCH, errors.ChunkNotStored("gone"), ErrorCode.NOT_FOUND),
        (STORE, errors.QuotaExceeded("full"), ErrorCode.QUOTA_FULL),
        (STORE, errors.ChunkHashMismatch("bad"), ErrorCode.BAD_HASH),
        # A rotten copy found by a fetch was dropped: the holder no longer has it.
        (FETCH, errors.ChunkHashMismatch("rot"), ErrorCode.NOT_FOUND),
        (STORE, errors.BadOption("lease"), ErrorCode.BAD_REQUEST),
        (STORE, errors.BadChunk("header"), ErrorCode.BAD_CHUNK),
        (STORE, errors.SourceLimitExceeded("share"), ErrorCode.SOURCE_LIMIT),
        (FETCH, errors.BadSignature("renewal"), ErrorCode.BAD_RENEWAL),
        (STORE, errors.StoreCorrupt("index"), ErrorCode.INTERNAL),
        (FETCH, OSError(5, "Input/output error", "/secret/path"), ErrorCode.INTERNAL),
    ],
)
def test_store_exceptions_become_typed_replies(request_, exc: Exception, code: ErrorCode) -> None:
    reply = error_reply(request_, exc)
    assert reply is not None
    assert (reply.request_id, reply.code) == (request_.request_id, code)
    assert "secret" not in reply.message  # names the failure, not paths or values


def test_unexpected_exception_is_left_to_the_caller() -> None:
    assert error_reply(STORE, RuntimeError("bug")) is None


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_code_raises_what_the_table_says(code: ErrorCode) -> None:
    expected = EXCEPTION_OF.get(code, errors.PeerUnreachable)
    with pytest.raises(expected) as info:
        raise_for(Error(1, code, "why"), ADDR, CID)
    assert "127.0.0.1:9" in str(info.value)


@pytest.mark.parametrize(
    ("exc", "request_"),
    [
        (errors.ChunkNotStored("x"), FETCH),
        (errors.QuotaExceeded("x"), STORE),
        (errors.ChunkHashMismatch("x"), STORE),
        (errors.BadChunk("x"), STORE),
        (errors.SourceLimitExceeded("x"), STORE),
        (errors.BadSignature("x"), FETCH),
    ],
)
def test_the_client_raises_what_the_holder_caught(exc: Exception, request_) -> None:
    reply = error_reply(request_, exc)
    assert reply is not None
    with pytest.raises(type(exc)):
        raise_for(reply, ADDR, CID)
