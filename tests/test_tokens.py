"""Return-path and unsubscribe tokens: round trips, and every forgery or alteration refused."""

from __future__ import annotations

import pytest

from relayd.feedback.tokens import BadToken, Tokens

QID = "0191A2B3C4D5E6F7"
NOW = 1_800_000_000.0


def test_a_return_path_names_its_message_and_fits_a_local_part():
    tokens = Tokens(b"k" * 32)
    address = tokens.return_path(QID, "bounces", "b.example.com")
    local, _, domain = address.partition("@")
    assert domain == "b.example.com" and len(local) <= 64 and local == local.lower()
    assert tokens.message_of(local.partition("+")[2]) == QID
    assert tokens.message_of(local.partition("+")[2].upper()) == QID  # case folded on the way


def test_forged_and_altered_return_paths_are_refused():
    token = Tokens(b"k" * 32).return_path(QID, "b", "d").partition("+")[2].partition("@")[0]
    with pytest.raises(BadToken):
        Tokens(b"x" * 32).message_of(token)  # another secret
    altered = ("b" if token[0] != "b" else "c") + token[1:]
    with pytest.raises(BadToken):
        Tokens(b"k" * 32).message_of(altered)
    for junk in ("", "!!", "a" * 5):
        with pytest.raises(BadToken):
            Tokens(b"k" * 32).message_of(junk)


def test_an_unsubscribe_token_round_trips_and_expires():
    tokens = Tokens(b"k" * 32)
    token = tokens.unsubscribe(QID, "Bob@example.net", "domain:shop.test", NOW)
    assert tokens.unsubscribed(token, NOW + 10, 86400) == (
        QID,
        "Bob@example.net",
        "domain:shop.test",
    )
    with pytest.raises(BadToken, match="expired"):
        tokens.unsubscribed(token, NOW + 86401, 86400)
    with pytest.raises(BadToken):
        Tokens(b"x" * 32).unsubscribed(token, NOW, 86400)
    with pytest.raises(BadToken):
        tokens.unsubscribed(token[:-2] + ("AA" if token[-2:] != "AA" else "BB"), NOW, 86400)
