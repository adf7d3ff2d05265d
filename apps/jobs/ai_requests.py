"""AI generation requests as the catalogue sees them: personas, defaults, and the identity of a
request for deduplication. The provider calls themselves live in `tasks/providers/`, run by
`tasks/kinds/ai_generate.py`."""

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from typing import Any

from django.conf import settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Persona:
    name: str
    system_prompt: str
    avatar_url: str = ""
    model: str = ""
    temperature: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def personas() -> dict[str, Persona]:
    """The personas of PERSONAS_DIR (`<name>.json` each: name, system_prompt, avatar_url, model,
    temperature). Read on each call, so a file dropped in the folder is there at once."""
    found: dict[str, Persona] = {}
    folder = settings.PERSONAS_DIR
    if not folder.is_dir():
        return found
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
            persona = Persona(
                name=str(data.get("name") or path.stem),
                system_prompt=str(data["system_prompt"]),
                avatar_url=str(data.get("avatar_url") or ""),
                model=str(data.get("model") or ""),
                temperature=float(data["temperature"]) if data.get("temperature") is not None else None,
            )
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("persona file %s skipped: %s", path, exc)
            continue
        found[persona.name] = persona
    return found


def default_model(provider: str) -> str:
    if provider == settings.AI_DEFAULT_PROVIDER and settings.AI_DEFAULT_MODEL:
        return settings.AI_DEFAULT_MODEL
    return settings.OPENAI_DEFAULT_MODEL if provider == "openai" else settings.ANTHROPIC_DEFAULT_MODEL


def resolve(payload: dict[str, Any], persona: Persona | None) -> dict[str, Any]:
    """The request as it will be sent: the persona's and the server's defaults filled in, so that
    the job shows what ran and two requests that mean the same thing look the same."""
    provider = payload.get("provider") or settings.AI_DEFAULT_PROVIDER
    messages = payload.get("messages") or [{"role": "user", "content": payload["prompt"]}]
    system = payload.get("system") or (persona.system_prompt if persona else "")
    temperature = payload.get("temperature")
    if temperature is None and persona:
        temperature = persona.temperature
    return {
        "provider": provider,
        "model": payload.get("model") or (persona.model if persona else "") or default_model(provider),
        "system": system,
        "messages": [{"role": m["role"], "content": m["content"]} for m in messages],
        "max_tokens": payload.get("max_tokens") or settings.AI_DEFAULT_MAX_TOKENS,
        "temperature": temperature,
        "persona": persona.name if persona else None,
        "dedupe": payload.get("dedupe", True),
    }


def dedupe_key(owner_id: int, request: dict[str, Any]) -> str:
    """Same owner, provider, model, messages and parameters -> same key."""
    identity = {k: request[k] for k in ("provider", "model", "system", "messages", "max_tokens", "temperature")}
    blob = json.dumps([owner_id, identity], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()
