"""Key generation and hashing, password hashing."""

import base64
import hashlib

from argon2 import PasswordHasher
import pytest

from mistral_serve.security import (
    api_key_prefix, check_new_password, generate_api_key, hash_api_key, hash_password, verify_password,
)


def test_keys_carry_at_least_128_random_bits_and_never_repeat():
    keys = {generate_api_key() for _ in range(1000)}
    assert len(keys) == 1000
    for key in list(keys)[:10]:
        assert key.startswith("msk-")
        secret = key.removeprefix("msk-")
        assert len(base64.urlsafe_b64decode(secret + "=" * (-len(secret) % 4))) * 8 >= 128


def test_a_key_hash_is_sha256_hex_and_its_prefix_is_short():
    key = generate_api_key()
    assert hash_api_key(key) == hashlib.sha256(key.encode()).hexdigest()
    assert len(hash_api_key(key)) == 64 and key not in hash_api_key(key)
    assert api_key_prefix(key) == key[4:12]
    with pytest.raises(ValueError):
        api_key_prefix("sk-something")


def test_passwords_hash_with_argon2id_at_owasp_parameters():
    stored = hash_password("correct horse battery")
    assert stored.startswith("$argon2id$") and "m=19456,t=2,p=1" in stored
    assert hash_password("correct horse battery") != stored  # salted
    check = verify_password(stored, "correct horse battery")
    assert check.is_valid and not check.needs_rehash
    assert not verify_password(stored, "correct horse batterY").is_valid
    assert not verify_password("not a hash", "correct horse battery").is_valid


def test_a_hash_with_weaker_parameters_verifies_and_asks_for_a_rehash():
    weak = PasswordHasher(time_cost=1, memory_cost=8 * 1024, parallelism=1).hash("correct horse battery")
    check = verify_password(weak, "correct horse battery")
    assert check.is_valid and check.needs_rehash


def test_no_hash_is_never_a_match():
    """Unknown users and password-less accounts: checked against a dummy hash, never valid."""
    assert not verify_password(None, "").is_valid
    assert not verify_password(None, "anything at all").is_valid


@pytest.mark.parametrize("password", ["", "short", "x" * 1025])
def test_unusable_new_passwords_are_refused(password):
    with pytest.raises(ValueError):
        check_new_password(password)
    with pytest.raises(ValueError):
        hash_password(password)
