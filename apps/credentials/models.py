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


class CallbackSecret(models.Model):
    """The key a user's job callbacks are signed with (HMAC-SHA256, see `tasks.callbacks`), one per user.

    The server needs the secret itself to sign, so it is stored encrypted (Fernet, as provider keys),
    not hashed. The API shows it once, when it is made (`POST /api/callback-secret/`, which replaces the
    one before); after that only `last4` and when it was made.
    """

    owner = models.OneToOneField(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="callback_secret")
    encrypted_secret = models.TextField()
    last4 = models.CharField(max_length=4)
    created_at = models.DateTimeField()

    def __str__(self) -> str:
        return f"callback secret …{self.last4}"


class TokenUsage(models.Model):
    """Tokens (in and out) a user's AI jobs used on the server's provider keys in one UTC day, against
    AI_USER_DAILY_TOKENS (a user's own keys are not counted: their provider bills them)."""

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="+")
    day = models.DateField()
    tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["owner", "day"], name="tokenusage_owner_day")]

    def __str__(self) -> str:
        return f"{self.day}: {self.tokens} tokens"
