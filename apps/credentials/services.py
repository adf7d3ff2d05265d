"""Storing and reading users' provider keys and callback secrets. Only these functions see them in plaintext."""

import secrets

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction
from django.utils import timezone

from apps.credentials import crypto
from apps.credentials.models import CallbackSecret, Credential

CALLBACK_SECRET_PREFIX = "whsec_"  # noqa: S105 (a prefix: recognisable in a receiver's settings and by secret scanners)


def store_credential(owner: AbstractBaseUser, provider: str, key: str) -> tuple[Credential, bool]:
    """Save `owner`'s key for `provider`, replacing one stored before. Returns (credential, created)."""
    credential, created = Credential.objects.update_or_create(
        owner=owner,
        provider=provider,
        defaults={"encrypted_key": crypto.encrypt(key), "last4": key[-4:]},
    )
    return credential, created


KEY_QUERY = f'SELECT "encrypted_key" FROM "{Credential._meta.db_table}" WHERE "owner_id" = %s AND "provider" = %s'  # noqa: S608


def key_for(owner_id: int, provider: str) -> str | None:
    """`owner_id`'s key for `provider`, decrypted, or None. Read by every AI job: one statement written
    out (compiling the ORM's query cost a worker of the threads pool a sixth of its time)."""
    with connection.cursor() as cursor:
        cursor.execute(KEY_QUERY, [owner_id, provider])
        row = cursor.fetchone()
    return crypto.decrypt(row[0]) if row else None


def key_for_orm(owner_id: int, provider: str) -> str | None:
    """What `key_for` does, through the ORM."""
    token = Credential.objects.filter(owner_id=owner_id, provider=provider).values_list("encrypted_key", flat=True)
    token = token.first()
    return crypto.decrypt(token) if token else None


def new_callback_secret(owner: AbstractBaseUser) -> tuple[CallbackSecret, str]:
    """Make `owner` a new callback secret, replacing the one before (callbacks sent from now on are
    signed with the new one). Returns the row and the secret: the only time it is shown."""
    secret = CALLBACK_SECRET_PREFIX + secrets.token_urlsafe(32)
    row, _ = CallbackSecret.objects.update_or_create(
        owner=owner,
        defaults={"encrypted_secret": crypto.encrypt(secret), "last4": secret[-4:], "created_at": timezone.now()},
    )
    return row, secret


def callback_secret_for(owner_id: int) -> str:
    """`owner_id`'s callback secret, decrypted; made on first need (a user who never asked for one
    makes one with `POST /api/callback-secret/`, which replaces it, to learn it)."""
    secret = CALLBACK_SECRET_PREFIX + secrets.token_urlsafe(32)
    row, _ = CallbackSecret.objects.get_or_create(  # two first deliveries at once: one row wins
        owner_id=owner_id,
        defaults={"encrypted_secret": crypto.encrypt(secret), "last4": secret[-4:], "created_at": timezone.now()},
    )
    return crypto.decrypt(row.encrypted_secret)


def rotate_all() -> int:
    """Re-encrypt every stored key and callback secret under the first of CREDENTIALS_KEYS. Returns how
    many rows."""
    count = 0
    with transaction.atomic():
        for credential in Credential.objects.select_for_update().only("pk", "encrypted_key"):
            credential.encrypted_key = crypto.rotate(credential.encrypted_key)
            credential.save(update_fields=["encrypted_key"])
            count += 1
        for row in CallbackSecret.objects.select_for_update().only("pk", "encrypted_secret"):
            row.encrypted_secret = crypto.rotate(row.encrypted_secret)
            row.save(update_fields=["encrypted_secret"])
            count += 1
    return count
