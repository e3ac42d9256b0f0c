"""The exception tree of p2pmega, one exit code per branch. Imports nothing from p2pmega.

    P2PMegaError                 base class, never raised directly
    ├─ UsageError       exit 2   bad link, missing file, bad option, bad geo table, output exists
    │  ├─ BadLink, BadGeoTable, InputFileError, OutputExists, BadOption
    ├─ NetworkError     exit 3   nothing reachable
    │  ├─ BootstrapFailed, PeerUnreachable (PeerRefused, PeerIncompatible, PeerNotAuthentic, RequestUnknown), TransferTimeout
    ├─ NotFoundError    exit 4   no holder has a needed chunk
    │  ├─ ManifestNotFound, ChunkUnavailable, ChunkNotStored
    ├─ IntegrityError   exit 5   decryption or hash failure no other holder could fix
    │  ├─ DecryptionFailed, ChunkHashMismatch, BadManifest (UnsafePath), BadSignature
    ├─ PlacementError   exit 6   not enough holders or countries for the rule
    │  └─ PlacementImpossible
    ├─ StorageError     exit 7   the local disk refused: chunk store quota full, output not writable
    │  └─ QuotaExceeded (SourceLimitExceeded), StoreCorrupt, OutputWriteFailed
    └─ LocalSetupError  exit 8   a local p2pmega process could not start (testnet/demo peer): its log says why
       └─ PeerStartFailed
    RemoteProtocolError          a peer sent garbage; net/ logs it and drops the peer; users never see it

Exit code 130 (interrupted) is produced by the CLI on Ctrl-C; it has no class.
Messages are one line, name the value that matters and what to do next, and never contain a key,
plaintext or a whole link.
"""

from __future__ import annotations

from typing import ClassVar


class P2PMegaError(Exception):
    """Base of every error p2pmega shows to a user; never raised directly."""

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        if type(self) is P2PMegaError:
            raise TypeError("raise a subclass of P2PMegaError, not the base class")
        super().__init__(message)


class UsageError(P2PMegaError):
    """The user asked for something that cannot work as asked (exit 2)."""

    exit_code = 2


class BadLink(UsageError):
    """A magnet link (read or keep-alive) is malformed."""


class BadGeoTable(UsageError):
    """The country override table has a bad line."""


class BadBlocTable(UsageError):
    """The table of jurisdiction blocs has a bad line."""


class InputFileError(UsageError):
    """The file to share is missing or unreadable."""


class OutputExists(UsageError):
    """The output file exists and --force was not given."""


class BadChunk(UsageError):
    """Bytes offered for storage that cannot be a p2pmega chunk (a holder refuses them)."""


class BadOption(UsageError):
    """An option value is out of range or malformed."""


class NetworkError(P2PMegaError):
    """Nothing (or not enough) of the network could be reached (exit 3)."""

    exit_code = 3


class BootstrapFailed(NetworkError):
    """No bootstrap node, saved contact or LAN peer answered."""


class PeerUnreachable(NetworkError):
    """One peer could not be reached or closed the connection."""


class PeerRefused(PeerUnreachable):
    """Nothing listens at a peer's address (connection refused): it is gone, not slow."""


class RequestUnknown(PeerUnreachable):
    """The peer refused a request as one it does not understand (BAD_REQUEST): most often it is older than it."""


class PeerIncompatible(PeerUnreachable):
    """A peer speaks another version of the transfer protocol (exit 3 when it was the only one)."""


class PeerNotAuthentic(PeerUnreachable):
    """A peer proved a key that is not the node id we expected at its address: not the peer we meant."""


class TransferTimeout(NetworkError):
    """A connection to a peer moved no data for the idle timeout, or could not be opened in time."""


class NotFoundError(P2PMegaError):
    """No reachable holder has something we need (exit 4)."""

    exit_code = 4


class ManifestNotFound(NotFoundError):
    """No holder has the manifest of a link."""


class ChunkUnavailable(NotFoundError):
    """No reachable holder has a chunk of the file."""


class ChunkNotStored(NotFoundError):
    """A holder's store does not have the asked chunk."""


class IntegrityError(P2PMegaError):
    """Data failed authentication or its hash check (exit 5)."""

    exit_code = 5


class DecryptionFailed(IntegrityError):
    """A sealed chunk did not authenticate under the link's key."""


class ChunkHashMismatch(IntegrityError):
    """Bytes do not hash to the chunk id they were offered under."""


class BadManifest(IntegrityError):
    """A manifest authenticated but does not decode to a valid manifest."""


class UnsafePath(BadManifest):
    """A shared folder's listing names a path that could land outside the output (absolute, ``..``) or is invalid."""


class BadSignature(IntegrityError):
    """A signed record failed verification."""


class PlacementError(P2PMegaError):
    """The placement rule cannot be met with the peers at hand (exit 6)."""

    exit_code = 6


class PlacementImpossible(PlacementError):
    """Not enough holders, countries or distinct networks for the rule."""


class RepairTimedOut(PlacementError):
    """The holders did not bring a file back to the rule in the time given (the demo's wait)."""


class StorageError(P2PMegaError):
    """The local chunk store or disk refused an operation (exit 7)."""

    exit_code = 7


class QuotaExceeded(StorageError):
    """Storing the chunk would exceed the store's quota."""


class SourceLimitExceeded(QuotaExceeded):
    """The sender's /24 (IPv6 /48) holds its share of the quota, or stored too fast: store elsewhere."""


class ForwardNotExpected(StorageError):
    """A forwarded copy that no sharer asked this holder to accept (no live EXPECT), or on other terms."""


class StoreCorrupt(StorageError):
    """The store's index or files are inconsistent beyond automatic repair."""


class OutputWriteFailed(StorageError):
    """Writing a fetched file failed part-way (disk full, I/O error); a rerun resumes."""


class LocalSetupError(P2PMegaError):
    """This machine could not start a p2pmega process it needed (exit 8); not the network's fault."""

    exit_code = 8


class PeerStartFailed(LocalSetupError):
    """A test-network peer process exited or never listened (its log names the cause)."""


class RemoteProtocolError(Exception):
    """A peer sent something that violates the protocol. Never shown to users: the peer is dropped."""
