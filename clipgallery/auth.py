"""Users, passwords, sessions and API tokens.

Passwords are stored as Argon2id hashes (argon2-cffi's defaults). Session and API tokens are
random 256-bit strings given to the client once; the database keeps only their SHA-256, so a
leaked database does not log anybody in. Failed logins are counted per user name in the
database, so the throttle holds across workers and restarts.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

_hasher = PasswordHasher()  # Argon2id, RFC 9106 low-memory profile
# Verified against when the user name is unknown, so both cases cost the same time.
_DUMMY_HASH = _hasher.hash("not a real password, only for timing")

MIN_PASSWORD_LENGTH = 10
FREE_FAILURES = 5  # failed logins before the lock-out starts
MAX_LOCK_SECONDS = 3600


class AuthError(Exception):
    """Wrong user name or password, or an unknown/expired session or token (deliberately vague)."""


class LockedOut(AuthError):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"Too many failed logins: try again in {retry_after} seconds.")
        self.retry_after = retry_after


class PermissionDenied(Exception):
    """Logged in, but not allowed to do this."""


@dataclass(frozen=True)
class CurrentUser:
    id: int
    username: str
    is_admin: bool


def _now() -> datetime:
    return datetime.now(UTC)


def _token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def validate_new_password(username: str, password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"The password must have at least {MIN_PASSWORD_LENGTH} characters.")
    if password.strip().lower() == username.strip().lower():
        raise ValueError("The password must differ from the user name.")


def validate_username(username: str) -> str:
    username = username.strip()
    if not 1 <= len(username) <= 64 or any(ch.isspace() or not ch.isprintable() for ch in username):
        raise ValueError("User names have 1 to 64 printable characters and no spaces.")
    return username


# --- users -----------------------------------------------------------------------------------


def create_user(session: Session, username: str, password: str, is_admin: bool = True) -> CurrentUser:
    username = validate_username(username)
    validate_new_password(username, password)
    try:
        user_id = session.execute(
            text("INSERT INTO users (username, password_hash, is_admin) VALUES (:u, :h, :a) RETURNING id"),
            {"u": username, "h": _hasher.hash(password), "a": is_admin},
        ).scalar_one()
        session.commit()
    except IntegrityError:
        session.rollback()
        raise ValueError(f"A user named {username!r} already exists.") from None
    return CurrentUser(user_id, username, is_admin)


def list_users(session: Session) -> list[CurrentUser]:
    rows = session.execute(text("SELECT id, username, is_admin FROM users ORDER BY username")).all()
    return [CurrentUser(*row) for row in rows]


def set_password(session: Session, username: str, new_password: str) -> None:
    """Change a password and end every session of that user."""
    validate_new_password(username, new_password)
    user_id = session.execute(
        text("UPDATE users SET password_hash = :h WHERE username = :u RETURNING id"),
        {"h": _hasher.hash(new_password), "u": username},
    ).scalar()
    if user_id is None:
        session.rollback()
        raise ValueError(f"No user named {username!r}.")
    session.execute(text("DELETE FROM user_sessions WHERE user_id = :id"), {"id": user_id})
    session.commit()


def change_own_password(session: Session, user: CurrentUser, old_password: str, new_password: str) -> None:
    hashed = session.execute(text("SELECT password_hash FROM users WHERE id = :id"), {"id": user.id}).scalar()
    if hashed is None or not _verify(hashed, old_password):
        raise AuthError("The current password is wrong.")
    set_password(session, user.username, new_password)


def _verify(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# --- login throttle --------------------------------------------------------------------------


def _lock_seconds(failures: int) -> int:
    if failures < FREE_FAILURES:
        return 0
    return min(MAX_LOCK_SECONDS, 30 * 2 ** (failures - FREE_FAILURES))


def authenticate(session: Session, username: str, password: str) -> CurrentUser:
    """Check a user name and password; raises AuthError (or LockedOut while throttled)."""
    key = username.strip().lower()[:200]
    now = _now()
    locked_until = session.execute(
        text("SELECT locked_until FROM login_attempts WHERE username = :u"), {"u": key}
    ).scalar()
    if locked_until is not None and locked_until > now:
        raise LockedOut(int((locked_until - now).total_seconds()) + 1)

    row = session.execute(
        text("SELECT id, username, is_admin, password_hash FROM users WHERE lower(username) = :u"), {"u": key}
    ).first()
    ok = _verify(row.password_hash if row else _DUMMY_HASH, password) and row is not None
    if not ok:
        failures = session.execute(
            text(
                "INSERT INTO login_attempts (username, failures, last_failure_at) VALUES (:u, 1, now()) "
                "ON CONFLICT (username) DO UPDATE SET failures = login_attempts.failures + 1, "
                "last_failure_at = now() RETURNING failures"
            ),
            {"u": key},
        ).scalar_one()
        lock = _lock_seconds(failures)
        if lock:
            session.execute(
                text("UPDATE login_attempts SET locked_until = now() + make_interval(secs => :s) WHERE username = :u"),
                {"s": lock, "u": key},
            )
        session.commit()
        raise AuthError("Wrong user name or password.")
    session.execute(text("DELETE FROM login_attempts WHERE username = :u"), {"u": key})
    if _hasher.check_needs_rehash(row.password_hash):
        session.execute(
            text("UPDATE users SET password_hash = :h WHERE id = :id"), {"h": _hasher.hash(password), "id": row.id}
        )
    session.commit()
    return CurrentUser(row.id, row.username, row.is_admin)


# --- sessions --------------------------------------------------------------------------------


def create_session(session: Session, user: CurrentUser, ttl: timedelta) -> str:
    """A new login session; returns the token for the client (stored only as a hash)."""
    token = secrets.token_urlsafe(32)
    session.execute(
        text(
            "INSERT INTO user_sessions (token_hash, user_id, expires_at) "
            "VALUES (:t, :u, now() + make_interval(secs => :s))"
        ),
        {"t": _token_hash(token), "u": user.id, "s": ttl.total_seconds()},
    )
    session.execute(text("DELETE FROM user_sessions WHERE expires_at < now()"))
    session.commit()
    return token


def session_user(session: Session, token: str | None) -> CurrentUser | None:
    """The user of a live session token, or None (unknown, expired or empty token)."""
    if not token:
        return None
    row = session.execute(
        text(
            "UPDATE user_sessions s SET last_seen_at = now() FROM users u "
            "WHERE s.token_hash = :t AND s.expires_at > now() AND u.id = s.user_id "
            "RETURNING u.id, u.username, u.is_admin"
        ),
        {"t": _token_hash(token)},
    ).first()
    session.commit()
    return CurrentUser(*row) if row else None


def end_session(session: Session, token: str | None) -> None:
    if token:
        session.execute(text("DELETE FROM user_sessions WHERE token_hash = :t"), {"t": _token_hash(token)})
        session.commit()


def require_admin(session: Session, token: str | None) -> CurrentUser:
    """The admin behind a session token; raises AuthError / PermissionDenied otherwise.

    Every admin page and admin event handler calls this on the server: a hidden button is not
    protection."""
    user = session_user(session, token)
    if user is None:
        raise AuthError("Please log in.")
    if not user.is_admin:
        raise PermissionDenied("This needs an administrator.")
    return user


# --- API tokens ------------------------------------------------------------------------------


def create_api_token(session: Session, user: CurrentUser, name: str, ttl: timedelta | None = None) -> str:
    if not user.is_admin:
        raise PermissionDenied("API tokens are issued to administrators only.")
    token = "cg_" + secrets.token_urlsafe(32)
    session.execute(
        text(
            "INSERT INTO api_tokens (user_id, name, token_hash, expires_at) VALUES (:u, :n, :t, "
            "CASE WHEN CAST(:s AS double precision) IS NULL THEN NULL "
            "ELSE now() + make_interval(secs => CAST(:s AS double precision)) END)"
        ),
        {
            "u": user.id,
            "n": name.strip()[:100] or "token",
            "t": _token_hash(token),
            "s": ttl.total_seconds() if ttl else None,
        },
    )
    session.commit()
    return token


def token_user(session: Session, token: str | None) -> CurrentUser | None:
    if not token:
        return None
    row = session.execute(
        text(
            "UPDATE api_tokens t SET last_used_at = now() FROM users u "
            "WHERE t.token_hash = :t AND (t.expires_at IS NULL OR t.expires_at > now()) AND u.id = t.user_id "
            "RETURNING u.id, u.username, u.is_admin"
        ),
        {"t": _token_hash(token)},
    ).first()
    session.commit()
    return CurrentUser(*row) if row else None


def revoke_api_token(session: Session, token_id: int) -> bool:
    deleted = session.execute(text("DELETE FROM api_tokens WHERE id = :id RETURNING id"), {"id": token_id}).scalar()
    session.commit()
    return deleted is not None
