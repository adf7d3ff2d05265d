"""Storing and reading users' provider keys. Only these functions see a plaintext key."""

from django.contrib.auth.models import AbstractBaseUser
from django.db import connection, transaction

from apps.credentials import crypto
from apps.credentials.models import Credential


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


def rotate_all() -> int:
    """Re-encrypt every stored key under the first of CREDENTIALS_KEYS. Returns how many rows."""
    count = 0
    with transaction.atomic():
        for credential in Credential.objects.select_for_update().only("pk", "encrypted_key"):
            credential.encrypted_key = crypto.rotate(credential.encrypted_key)
            credential.save(update_fields=["encrypted_key"])
            count += 1
    return count
