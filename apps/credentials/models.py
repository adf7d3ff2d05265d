from django.conf import settings
from django.db import models


class Provider(models.TextChoices):
    OPENAI = "openai", "OpenAI-compatible"
    ANTHROPIC = "anthropic", "Anthropic"


class Credential(models.Model):
    """A user's own API key for a provider (bring your own key), encrypted at rest with Fernet.

    The key is never returned: the API and the admin show `last4` only. Workers decrypt it when a job
    needs it (`apps.credentials.services.key_for`) and drop it after the call.
    """

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="credentials")
    provider = models.CharField(max_length=16, choices=Provider.choices)
    encrypted_key = models.TextField()
    last4 = models.CharField(max_length=4)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "provider"], name="credential_owner_provider")]

    def __str__(self) -> str:
        return f"{self.provider} key …{self.last4}"
