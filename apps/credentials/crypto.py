"""Fernet encryption of stored keys. `CREDENTIALS_KEYS` lists Fernet keys: the first encrypts, all of
them decrypt, so a new key is put first, `manage.py rotate_credentials` re-encrypts every row under
it, and the old key can then be dropped."""

import base64
import hashlib

from cryptography.fernet import Fernet, MultiFernet
from django.conf import settings


def fernet() -> MultiFernet:
    keys = list(settings.CREDENTIALS_KEYS)
    if not keys:
        # No keys configured: one derived from SECRET_KEY (changing SECRET_KEY then loses the keys).
        digest = hashlib.sha256(b"conveyor-credentials:" + settings.SECRET_KEY.encode()).digest()
        keys = [base64.urlsafe_b64encode(digest).decode()]
    return MultiFernet([Fernet(key) for key in keys])


def encrypt(plaintext: str) -> str:
    return fernet().encrypt(plaintext.encode()).decode()


def decrypt(token: str) -> str:
    return fernet().decrypt(token.encode()).decode()


def rotate(token: str) -> str:
    return fernet().rotate(token.encode()).decode()
