"""Users' provider keys (BYOK): write-only through the API and the admin, encrypted at rest, rotated to
a new encryption key, and read back by the written-out query as the ORM reads them."""

import json

import pytest
from cryptography.fernet import Fernet, InvalidToken
from django.contrib.auth.models import User
from django.core.management import call_command
from django.test import Client, override_settings
from rest_framework.test import APIClient

from apps.credentials.models import Credential
from apps.credentials.services import key_for, key_for_orm
from tests.factories import make_credential, make_user

pytestmark = pytest.mark.django_db


def test_rotation_re_encrypts_every_key_under_the_first_key(user: User) -> None:
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with override_settings(CREDENTIALS_KEYS=[old]):
        make_credential(user, "openai", "sk-x")

    with override_settings(CREDENTIALS_KEYS=[new, old]):
        call_command("rotate_credentials")
        assert key_for(user.pk, "openai") == "sk-x"

    with override_settings(CREDENTIALS_KEYS=[new]):  # the old key can go
        assert key_for(user.pk, "openai") == "sk-x"
    token = Credential.objects.get().encrypted_key
    with pytest.raises(InvalidToken):
        Fernet(old).decrypt(token.encode())


def test_the_written_out_key_query_reads_what_the_orm_reads(user: User, other_user: User) -> None:
    make_credential(user, "openai", "sk-user-openai-1")
    make_credential(other_user, "openai", "sk-other-openai-2")
    make_credential(user, "anthropic", "sk-ant-user-3")

    for owner, provider in [(user, "openai"), (other_user, "openai"), (user, "anthropic"), (other_user, "anthropic")]:
        assert key_for(owner.pk, provider) == key_for_orm(owner.pk, provider)
    assert (key_for(user.pk, "openai"), key_for(other_user.pk, "anthropic")) == ("sk-user-openai-1", None)


def test_credentials_are_write_only_per_user_and_can_be_replaced_and_deleted(
    api: APIClient, other_api: APIClient
) -> None:
    stored = api.post("/api/credentials/", {"provider": "openai", "key": "sk-first-0000"}, format="json")
    assert stored.status_code == 201, stored.content
    created = stored.json()
    replaced = api.post("/api/credentials/", {"provider": "openai", "key": "sk-second-1111"}, format="json")

    assert replaced.status_code == 200
    assert replaced.json()["last4"] == "1111"
    listed = api.get("/api/credentials/").json()
    assert [(c["provider"], c["last4"]) for c in listed] == [("openai", "1111")]
    assert "sk-second" not in json.dumps(listed)
    assert other_api.get(f"/api/credentials/{created['id']}/").status_code == 404
    assert other_api.delete(f"/api/credentials/{created['id']}/").status_code == 404
    bad = api.post("/api/credentials/", {"provider": "nope", "key": "short"}, format="json")
    assert bad.status_code == 400
    assert set(bad.json()) == {"provider", "key"}
    assert api.delete(f"/api/credentials/{created['id']}/").status_code == 204
    assert Credential.objects.count() == 0


def test_the_admin_never_shows_a_stored_key(client: Client, user: User) -> None:
    client.force_login(make_user("root", superuser=True))
    store = client.post(
        "/admin/credentials/credential/add/", {"owner": user.pk, "provider": "openai", "key": "sk-admin-secret-9876"}
    )
    assert store.status_code == 302
    credential = Credential.objects.get()

    html = client.get(f"/admin/credentials/credential/{credential.pk}/change/").content.decode()
    listing = client.get("/admin/credentials/credential/").content.decode()

    assert "sk-admin-secret" not in html + listing
    assert credential.encrypted_key not in html
    assert "…9876" in listing
    assert key_for(user.pk, "openai") == "sk-admin-secret-9876"
