"""Bearer tokens for the HTTP API: the token file, roles, and the check of one request.

A token file has one ``TOKEN ROLE`` a line; ``#`` starts a comment, blank lines are ignored::

    # ops dashboards
    3f9c2b7e0d51a4c8e6b1f0a9d2c7e5b4 read
    9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d write

Roles are ordered ``read < write < admin``: a token may do what its role and every lower role
may. A token is 16-512 characters from RFC 6750's ``b64token`` alphabet (letters, digits and
``-._~+/``, optionally ending in ``=``), so it can be sent unchanged as ``Authorization: Bearer
TOKEN``. A file that breaks any rule, or holds no token, is refused as a whole with the line
number (never the token) in the message.

Tokens are never kept in memory as given: the table holds their SHA-256 digests and compares a
presented token's digest against every one with :func:`hmac.compare_digest`, visiting all of
them whatever matches, so the answer's timing tells nothing about how much of a token was right.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
import re
import stat
from dataclasses import dataclass

from twisted.logger import Logger

from kommander.core.errors import ConfigurationError

_log = Logger()

_TOKEN = re.compile(r"^[A-Za-z0-9\-._~+/]+=*$")
MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512
#: A token file larger than this is refused rather than read.
MAX_FILE_BYTES = 1024 * 1024


class Role(enum.IntEnum):
    """What a token may do; a higher role includes the lower ones."""

    READ = 1
    WRITE = 2
    ADMIN = 3


class Outcome(enum.Enum):
    """The result of :meth:`TokenTable.check`."""

    ALLOWED = "allowed"
    #: No ``Authorization`` header, another scheme, or a malformed one: answer 401.
    MISSING = "missing"
    #: A well-formed bearer token that is not in the table: answer 401.
    UNKNOWN = "unknown"
    #: A known token whose role is below the one needed: answer 403.
    FORBIDDEN = "forbidden"


@dataclass(frozen=True, slots=True)
class Verdict:
    """:attr:`outcome` of a check, with the token's :attr:`role` when it was known."""

    outcome: Outcome
    role: Role | None = None


def parse_tokens(text: str, source: str = "token file") -> dict[bytes, Role]:
    """The table ``sha256(token) -> role`` of a token file's text.

    :param source: names the file in error messages.
    :raises ConfigurationError: a line is not ``TOKEN ROLE``, a token is malformed or repeated, a
        role is unknown, or there is no token at all. Messages give the line, never the token.
    """
    table: dict[bytes, Role] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        where = f"{source}, line {number}"
        fields = line.split()
        if len(fields) != 2:
            raise ConfigurationError(f"{where}: expected 'TOKEN ROLE', found {len(fields)} fields")
        token, role_name = fields
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS or not _TOKEN.match(token):
            raise ConfigurationError(
                f"{where}: a token is {MIN_TOKEN_CHARS}-{MAX_TOKEN_CHARS} characters of letters, digits "
                "and -._~+/ (optionally ending in =); e.g. the output of `openssl rand -hex 16`"
            )
        try:
            role = Role[role_name.upper()]
        except KeyError:
            raise ConfigurationError(f"{where}: unknown role {role_name!r}; use read, write or admin") from None
        digest = hashlib.sha256(token.encode("ascii")).digest()
        if digest in table:
            raise ConfigurationError(f"{where}: this token is already listed")
        table[digest] = role
    if not table:
        raise ConfigurationError(f"{source}: no tokens; every request would be refused")
    return table


def bearer_token(header: bytes | None) -> bytes | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, or ``None``.

    The scheme is case-insensitive (RFC 7235); anything but exactly one well-formed token after it
    gives ``None``.
    """
    if not header:
        return None
    scheme, _, token = header.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or len(token) > MAX_TOKEN_CHARS:
        return None
    try:
        if not _TOKEN.match(token.decode("ascii")):
            return None
    except UnicodeDecodeError:
        return None
    return token


class TokenTable:
    """The tokens of one file, re-readable with :meth:`reload`.

    :param path: the token file.
    :raises ConfigurationError: the file cannot be read or is malformed (see :func:`parse_tokens`).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._digests: tuple[tuple[bytes, Role], ...] = tuple(self._read().items())

    def __len__(self) -> int:
        return len(self._digests)

    def _read(self) -> dict[bytes, Role]:
        source = f"--http-token-file {self.path!r}"
        try:
            with open(self.path, "rb") as f:
                info = os.fstat(f.fileno())
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            raise ConfigurationError(f"{source}: cannot read it: {e.strerror or e}") from None
        if len(data) > MAX_FILE_BYTES:
            raise ConfigurationError(f"{source}: larger than {MAX_FILE_BYTES} bytes")
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(f"{source}: not UTF-8 text") from None
        table = parse_tokens(text, source)
        if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
            _log.warn(
                "{source} can be read by other users (mode {mode:o}); chmod 600 it",
                source=source,
                mode=stat.S_IMODE(info.st_mode),
            )
        return table

    def reload(self) -> bool:
        """Read the file again; on any error keep the tokens in use and log why.

        :returns: whether the new tokens are in use.
        """
        try:
            table = self._read()
        except ConfigurationError as e:
            _log.error("not reloading HTTP tokens, keeping the {n} in use: {why}", n=len(self), why=str(e))
            return False
        self._digests = tuple(table.items())
        _log.info("reloaded HTTP tokens from {path}: {n} tokens", path=self.path, n=len(table))
        return True

    def role_of(self, token: bytes) -> Role | None:
        """The role of ``token``, or ``None``; every digest is compared, in constant time each."""
        presented = hashlib.sha256(token).digest()
        found: Role | None = None
        for digest, role in self._digests:
            if hmac.compare_digest(digest, presented):
                found = role
        return found

    def check(self, authorization: bytes | None, needed: Role) -> Verdict:
        """Whether a request with this ``Authorization`` header value may do what needs ``needed``."""
        token = bearer_token(authorization)
        if token is None:
            return Verdict(Outcome.MISSING)
        role = self.role_of(token)
        if role is None:
            return Verdict(Outcome.UNKNOWN)
        if role < needed:
            return Verdict(Outcome.FORBIDDEN, role)
        return Verdict(Outcome.ALLOWED, role)
