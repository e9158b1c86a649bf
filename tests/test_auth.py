from datetime import timedelta

import pytest
from sqlalchemy import text

from clipgallery import auth
from clipgallery.auth import AuthError, LockedOut, PermissionDenied


def test_passwords_are_stored_as_argon2id_hashes(session):
    auth.create_user(session, "alice", "correct horse battery")
    stored = session.execute(text("SELECT password_hash FROM users WHERE username = 'alice'")).scalar_one()
    assert stored.startswith("$argon2id$") and "correct horse" not in stored
    assert auth.authenticate(session, "alice", "correct horse battery").is_admin
    assert auth.authenticate(session, "ALICE", "correct horse battery").username == "alice"
    with pytest.raises(AuthError, match="Wrong user name or password"):
        auth.authenticate(session, "alice", "wrong password!")
    with pytest.raises(AuthError, match="Wrong user name or password"):
        auth.authenticate(session, "nobody", "whatever password")


@pytest.mark.parametrize(
    "username,password,words",
    [("bob", "short", "at least 10"), ("bob", "bobbobbobbob", None), ("b ob", "long enough pw", "no spaces")],
)
def test_weak_passwords_and_bad_names_are_refused(session, username, password, words):
    if words is None:
        auth.create_user(session, username, password)
        return
    with pytest.raises(ValueError, match=words):
        auth.create_user(session, username, password)


def test_duplicate_user_is_refused(session):
    auth.create_user(session, "carol", "a long password")
    with pytest.raises(ValueError, match="already exists"):
        auth.create_user(session, "carol", "another long password")


def test_brute_force_is_locked_out_with_the_counter_in_the_database(session):
    auth.create_user(session, "dave", "the real password")
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError):
            auth.authenticate(session, "dave", "guess guess guess")
    with pytest.raises(LockedOut) as locked:
        auth.authenticate(session, "dave", "the real password")  # even the right one, while locked
    assert 0 < locked.value.retry_after <= 31
    row = session.execute(text("SELECT failures, locked_until > now() FROM login_attempts WHERE username = 'dave'"))
    assert tuple(row.one()) == (auth.FREE_FAILURES, True)
    # Unknown names are throttled the same way: no hint which names exist.
    for _ in range(auth.FREE_FAILURES):
        with pytest.raises(AuthError):
            auth.authenticate(session, "mallory", "guess guess guess")
    with pytest.raises(LockedOut):
        auth.authenticate(session, "mallory", "guess guess guess")
    # After the lock expires a correct login resets the counter.
    session.execute(text("UPDATE login_attempts SET locked_until = now() - interval '1 second'"))
    session.commit()
    assert auth.authenticate(session, "dave", "the real password").username == "dave"
    assert session.execute(text("SELECT count(*) FROM login_attempts WHERE username = 'dave'")).scalar_one() == 0


def test_sessions_expire_end_and_are_stored_hashed(session):
    user = auth.create_user(session, "erin", "erins long password")
    token = auth.create_session(session, user, timedelta(hours=1))
    assert auth.session_user(session, token) == user
    assert session.execute(text("SELECT count(*) FROM user_sessions WHERE token_hash = :t"), {"t": token}).scalar() == 0
    assert auth.require_admin(session, token) == user
    session.execute(text("UPDATE user_sessions SET expires_at = now() - interval '1 second'"))
    session.commit()
    assert auth.session_user(session, token) is None
    with pytest.raises(AuthError, match="log in"):
        auth.require_admin(session, token)
    fresh = auth.create_session(session, user, timedelta(hours=1))
    auth.end_session(session, fresh)
    assert auth.session_user(session, fresh) is None
    for bad in (None, "", "not-a-token", "x" * 10_000, "'; DROP TABLE users; --"):
        assert auth.session_user(session, bad) is None


def test_non_admins_are_refused_admin_work(session):
    viewer = auth.create_user(session, "frank", "franks long password", is_admin=False)
    token = auth.create_session(session, viewer, timedelta(hours=1))
    with pytest.raises(PermissionDenied):
        auth.require_admin(session, token)
    with pytest.raises(PermissionDenied):
        auth.create_api_token(session, viewer, "nope")


def test_password_change_ends_sessions(session):
    user = auth.create_user(session, "gina", "ginas long password")
    token = auth.create_session(session, user, timedelta(hours=1))
    with pytest.raises(AuthError):
        auth.change_own_password(session, user, "not the password", "a brand new password")
    auth.change_own_password(session, user, "ginas long password", "a brand new password")
    assert auth.session_user(session, token) is None
    assert auth.authenticate(session, "gina", "a brand new password") == user


def test_api_tokens(session):
    admin = auth.create_user(session, "hank", "hanks long password")
    token = auth.create_api_token(session, admin, "ci uploads")
    assert token.startswith("cg_") and auth.token_user(session, token) == admin
    short = auth.create_api_token(session, admin, "short", ttl=timedelta(seconds=-1))
    assert auth.token_user(session, short) is None
    token_id = session.execute(text("SELECT id FROM api_tokens WHERE name = 'ci uploads'")).scalar_one()
    assert auth.revoke_api_token(session, token_id)
    assert auth.token_user(session, token) is None
