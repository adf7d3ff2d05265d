"""The catalogue of job kinds: payload schema, queue and defaults of each.

The API validates payloads here, without importing worker code; `tasks/` maps each kind to its
handler by the same name.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import validate_email
from rest_framework import serializers

from apps.jobs import ai_requests
from apps.jobs.archives import ArchiveError, check_files, check_relative_path
from apps.jobs.models import Upload


class PayloadSerializer(serializers.Serializer):
    """A payload schema that refuses fields it does not know, so a typo is an error, not a no-op."""

    def to_internal_value(self, data: object) -> dict:
        attrs = super().to_internal_value(data)  # refuses anything but a mapping
        unknown = sorted(set(data) - set(self.fields))
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return attrs


class EchoPayload(PayloadSerializer):
    message = serializers.CharField(allow_blank=True)  # as long as the payload limit lets it be
    sleep_ms = serializers.IntegerField(min_value=0, max_value=3_600_000, default=0)
    fail_times = serializers.IntegerField(min_value=0, max_value=100, default=0)
    progress_steps = serializers.IntegerField(min_value=0, max_value=1_000, default=0)


ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A git ref as `git fetch` takes it: a branch, tag, full ref or commit; never an option.
GIT_REF = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@+-]{0,199}")


class SourceField(serializers.Field):
    """SOURCE: exactly one of `{"files": {path: text}}`, `{"upload": id}`, `{"git": {"url", "ref"}}`."""

    default_error_messages = {"invalid": "Expected an object with exactly one of 'files', 'upload', 'git'."}

    def to_internal_value(self, data: Any) -> dict:
        if not isinstance(data, dict) or len(data) != 1 or next(iter(data)) not in ("files", "upload", "git"):
            self.fail("invalid")
        ((form, value),) = data.items()
        return {form: getattr(self, f"_{form}")(value)}

    def to_representation(self, value: dict) -> dict:
        return value

    def _files(self, files: Any) -> dict[str, str]:
        if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
            raise serializers.ValidationError({"files": ["Expected a non-empty object of path -> text."]})
        try:
            check_files(files)
        except ArchiveError as exc:
            raise serializers.ValidationError({"files": [str(exc)]}) from exc
        return files

    def _upload(self, upload_id: Any) -> str:
        request = self.context.get("request")
        uploads = Upload.objects.filter(owner=request.user) if request else Upload.objects.none()
        try:
            found = uploads.filter(pk=str(upload_id)).exists()
        except DjangoValidationError:  # not a UUID
            found = False
        if not found:
            raise serializers.ValidationError({"upload": ["No such upload."]})
        return str(upload_id)

    def _git(self, git: Any) -> dict[str, str]:
        if not isinstance(git, dict) or set(git) - {"url", "ref"} or not isinstance(git.get("url"), str):
            raise serializers.ValidationError({"git": ['Expected {"url", "ref"}.']})
        url, ref = git["url"], git.get("ref", "HEAD")
        parts = urlsplit(url)
        schemes = settings.JOB_GIT_SCHEMES
        if parts.scheme not in schemes:
            raise serializers.ValidationError(
                {"git": {"url": [f"The URL scheme must be one of: {', '.join(schemes)}."]}}
            )
        if parts.username or parts.password:
            raise serializers.ValidationError({"git": {"url": ["Credentials in the URL are not accepted."]}})
        if parts.scheme != "file" and not parts.hostname:
            raise serializers.ValidationError({"git": {"url": ["The URL has no host."]}})
        if parts.scheme == "file" and not _within(os.path.normpath(parts.path), settings.JOB_GIT_FILE_ROOTS):
            roots = ", ".join(settings.JOB_GIT_FILE_ROOTS) or "none configured"
            raise serializers.ValidationError(
                {"git": {"url": [f"file:// repositories must lie in JOB_GIT_FILE_ROOTS ({roots})."]}}
            )
        if not isinstance(ref, str) or not GIT_REF.fullmatch(ref) or ".." in ref:
            raise serializers.ValidationError({"git": {"ref": ["Not a valid branch, tag or commit name."]}})
        return {"url": url, "ref": ref}


def _within(path: str, roots: list[str]) -> bool:
    return any(
        os.path.normpath(root) != "/" and os.path.commonpath([path, os.path.normpath(root)]) == os.path.normpath(root)
        for root in roots
        if os.path.isabs(path)
    )


class ToolPayload(PayloadSerializer):
    """build / test / lint: a source tree, and optionally the command, its environment and artifact globs."""

    source = SourceField()
    command = serializers.ListField(
        child=serializers.CharField(max_length=4096, allow_blank=True, trim_whitespace=False),
        min_length=1,
        max_length=256,
        required=False,
    )
    env = serializers.DictField(
        child=serializers.CharField(max_length=16_384, allow_blank=True, trim_whitespace=False),
        required=False,
        default=dict,
    )
    artifacts = serializers.ListField(child=serializers.CharField(max_length=500), max_length=50, required=False)

    def validate_command(self, argv: list[str]) -> list[str]:
        allowed = settings.JOB_COMMAND_ALLOWLIST
        if argv[0] not in allowed:
            raise serializers.ValidationError(
                f"{argv[0]!r} is not an allowed program; allowed: {', '.join(allowed)} (by bare name)."
            )
        return argv

    def validate_env(self, env: dict[str, str]) -> dict[str, str]:
        if len(env) > 100:
            raise serializers.ValidationError("At most 100 variables.")
        bad = sorted(name for name in env if not ENV_NAME.fullmatch(name))
        if bad:
            raise serializers.ValidationError(f"Not valid variable names: {', '.join(bad)}.")
        return env

    def validate_artifacts(self, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            try:
                check_relative_path(pattern)
            except ArchiveError as exc:
                raise serializers.ValidationError(f"{exc} (patterns are relative to the source tree)") from exc
        return patterns


class MessageSerializer(serializers.Serializer):
    role = serializers.ChoiceField(choices=["system", "user", "assistant"])
    content = serializers.CharField(max_length=200_000, trim_whitespace=False)


class AIGeneratePayload(PayloadSerializer):
    """ai_generate: a `prompt` or `messages`, optional system prompt, persona, provider, model and
    parameters. Validated data is the resolved request (see `apps.jobs.ai_requests.resolve`)."""

    prompt = serializers.CharField(max_length=200_000, required=False, trim_whitespace=False)
    messages = MessageSerializer(many=True, required=False, allow_empty=False, max_length=500)
    system = serializers.CharField(max_length=100_000, required=False, allow_blank=True, trim_whitespace=False)
    persona = serializers.CharField(max_length=100, required=False)
    provider = serializers.ChoiceField(choices=list(settings.AI_PROVIDERS), required=False)
    model = serializers.CharField(max_length=200, required=False)
    max_tokens = serializers.IntegerField(min_value=1, max_value=200_000, required=False)
    temperature = serializers.FloatField(min_value=0, max_value=2, required=False)
    dedupe = serializers.BooleanField(default=True)

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        if ("prompt" in attrs) == ("messages" in attrs):
            raise serializers.ValidationError({"prompt": ["Give either 'prompt' or 'messages'."]})
        persona = None
        if name := attrs.get("persona"):
            persona = ai_requests.personas().get(name)
            if persona is None:
                raise serializers.ValidationError({"persona": [f"Unknown persona {name!r}."]})
        return ai_requests.resolve(attrs, persona)


E164 = re.compile(r"\+[1-9][0-9]{6,14}")
SNOWFLAKE = re.compile(r"[0-9]{17,20}")
DISCORD_WEBHOOK_URL = re.compile(
    r"https://(?:discord|discordapp|ptb\.discord|canary\.discord)\.com/api(?:/v[0-9]+)?/webhooks/[0-9]{17,20}/[A-Za-z0-9._-]{60,100}"
)
MESSAGE_TEXT_MAX = {"discord": 20_000, "sms": 16_000, "email": 200_000}  # 10 parts of each channel at most


def persona_name_problem(name: str) -> str:
    """Why Discord would refuse `name` as a webhook's user name, or ""."""
    if len(name) > 80:
        return "a Discord name has at most 80 characters"
    if "discord" in name.lower() or "clyde" in name.lower():
        return "Discord refuses names containing 'discord' or 'clyde'"
    return ""


class MessagePayload(PayloadSerializer):
    """message: a text to one destination on Discord (a channel id, or a webhook URL), SMS (an E.164
    number) or email (an address), with an email's subject and HTML, and a persona to speak as on
    Discord."""

    channel = serializers.ChoiceField(choices=["discord", "sms", "email"])
    to = serializers.CharField(max_length=320, required=False)
    text = serializers.CharField(max_length=200_000, trim_whitespace=False)
    subject = serializers.CharField(max_length=998, required=False, allow_blank=True)
    html = serializers.CharField(max_length=1_000_000, required=False, trim_whitespace=False)
    persona = serializers.CharField(max_length=100, required=False)
    webhook_url = serializers.CharField(max_length=300, required=False)

    def validate(self, attrs: dict) -> dict:
        attrs = super().validate(attrs)
        channel, to = attrs["channel"], attrs.get("to", "")
        errors: dict[str, list[str]] = {}
        if len(attrs["text"]) > MESSAGE_TEXT_MAX[channel]:
            errors["text"] = [f"At most {MESSAGE_TEXT_MAX[channel]} characters for {channel}."]
        if not attrs["text"].strip():
            errors["text"] = ["The text is empty."]
        for name in ("subject", "html"):
            if name in attrs and channel != "email":
                errors[name] = ["Only for email."]
        for name in ("persona", "webhook_url"):
            if name in attrs and channel != "discord":
                errors[name] = ["Only for discord."]
        if channel == "sms" and not E164.fullmatch(to):
            errors["to"] = ["An SMS goes to a phone number in E.164 form, such as +15551234567."]
        elif channel == "email":
            try:
                validate_email(to)
            except DjangoValidationError:
                errors["to"] = ["Not a valid email address."]
            if "\r" in attrs.get("subject", "") or "\n" in attrs.get("subject", ""):
                errors["subject"] = ["A subject is one line."]
        elif channel == "discord":
            if "webhook_url" in attrs:
                if not DISCORD_WEBHOOK_URL.fullmatch(attrs["webhook_url"]):
                    errors["webhook_url"] = [
                        "Not a Discord webhook URL (https://discord.com/api/webhooks/<id>/<token>)."
                    ]
                if to:
                    errors["to"] = ["Give either 'to' (a channel id) or 'webhook_url'."]
            elif not SNOWFLAKE.fullmatch(to):
                errors["to"] = ["A Discord channel id (17 to 20 digits), or give 'webhook_url'."]
        if name := attrs.get("persona"):
            persona = ai_requests.personas().get(name)
            if persona is None:
                errors["persona"] = [f"Unknown persona {name!r}."]
            elif problem := persona_name_problem(persona.name):
                errors["persona"] = [problem]
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


def shown_payload(kind: str, payload: Any) -> Any:
    """A payload as answers and pages show it: a Discord webhook URL's token (a secret: whoever has it
    may post as the webhook) is left out."""
    if kind == "message" and isinstance(payload, dict) and isinstance(payload.get("webhook_url"), str):
        base, _, _token = payload["webhook_url"].rpartition("/")
        return {**payload, "webhook_url": f"{base}/…"}
    return payload


@dataclass(frozen=True)
class Kind:
    name: str
    queue: str
    payload_serializer: type[PayloadSerializer]  # validates the payload (and resolves defaults)
    max_attempts: int = 3
    timeout_seconds: int = 300
    # (owner id, validated payload) -> the request's identity, for kinds where an identical request
    # gets the job already under way (or just finished) instead of a new one; None: no deduplication.
    dedupe_key: Callable[[int, dict], str | None] | None = None
    # Whether `apps.jobs.signals.job_finished` is sent when a job of this kind ends (given the job).
    signals_finish: Callable[[Any], bool] | None = None


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind(
            "echo",
            queue="default",
            payload_serializer=EchoPayload,
            max_attempts=3,
            timeout_seconds=60,
        ),
        # Attempts for 429, 5xx and timeouts; a 4xx from the provider fails at once.
        Kind(
            "ai_generate",
            queue="ai",
            payload_serializer=AIGeneratePayload,
            max_attempts=5,
            timeout_seconds=300,
            dedupe_key=lambda owner, payload: ai_requests.dedupe_key(owner, payload) if payload["dedupe"] else None,
        ),
        # A tool's verdict (failing tests, lint findings) is a result, never retried; the attempts
        # are for what is passing: a git host that did not answer, a lost worker.
        # A 429 or a full rate limit puts the job off without using an attempt (see RateLimited); the
        # attempts are for what fails: a provider's 5xx, no answer.
        Kind(
            "message",
            queue="messages",
            payload_serializer=MessagePayload,
            max_attempts=5,
            timeout_seconds=120,
            # an SMS's status callbacks may come while it runs: its result takes them when it ends
            signals_finish=lambda job: job.payload.get("channel") == "sms" and bool(settings.PUBLIC_BASE_URL),
        ),
        *(
            Kind(name, queue="builds", payload_serializer=ToolPayload, max_attempts=2, timeout_seconds=600)
            for name in ("build", "test", "lint")
        ),
    )
}


def get_kind(name: str) -> Kind:
    return KINDS[name]
