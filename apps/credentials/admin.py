from django import forms
from django.contrib import admin
from django.http import HttpRequest

from apps.credentials import crypto
from apps.credentials.models import CallbackSecret, Credential, TokenUsage


class CredentialForm(forms.ModelForm):
    """The key is write-only: the field starts empty and is never rendered back."""

    key = forms.CharField(
        widget=forms.PasswordInput(render_value=False),
        required=False,
        help_text="Write-only. Leave empty to keep the stored key.",
    )

    class Meta:
        model = Credential
        fields = ["owner", "provider"]

    def clean(self) -> dict:
        data = super().clean()
        if not self.instance.pk and not data.get("key"):
            self.add_error("key", "A key is required.")
        return data

    def save(self, commit: bool = True) -> Credential:
        credential = super().save(commit=False)
        if key := self.cleaned_data.get("key"):
            credential.encrypted_key = crypto.encrypt(key)
            credential.last4 = key[-4:]
        if commit:
            credential.save()
        return credential


@admin.register(Credential)
class CredentialAdmin(admin.ModelAdmin):
    form = CredentialForm
    list_display = ["owner", "provider", "masked", "updated_at"]
    list_filter = ["provider"]
    search_fields = ["owner__username"]
    readonly_fields = ["masked", "created_at", "updated_at"]

    @admin.display(description="key")
    def masked(self, credential: Credential) -> str:
        return f"…{credential.last4}" if credential.last4 else "-"

    def get_fields(self, request: HttpRequest, obj: Credential | None = None) -> list[str]:
        return ["owner", "provider", "key", "masked", "created_at", "updated_at"]


@admin.register(CallbackSecret)
class CallbackSecretAdmin(admin.ModelAdmin):
    """Seen, never shown, and never made here: a secret is made (and shown, once) by its owner through
    `POST /api/callback-secret/`. Deleting one has the next callback make a new one."""

    list_display = ["owner", "masked", "created_at"]
    search_fields = ["owner__username"]
    fields = ["owner", "masked", "created_at"]
    readonly_fields = fields

    @admin.display(description="secret")
    def masked(self, row: CallbackSecret) -> str:
        return f"…{row.last4}"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(TokenUsage)
class TokenUsageAdmin(admin.ModelAdmin):
    """Tokens used per user and day on the server's keys (AI_USER_DAILY_TOKENS); an operator may
    lower a day's count to give a user more room."""

    list_display = ["day", "owner", "tokens"]
    list_filter = ["day"]
    search_fields = ["owner__username"]
    list_select_related = ["owner"]
    ordering = ["-day", "-tokens"]
