"""`python manage.py jobs submit|list|show|cancel|retry|replay-dead`: the job platform for operators,
readable in a terminal, `--json` for scripts. Every write goes through the same services as the API."""

import json
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.core.serializers.json import DjangoJSONEncoder

from apps.jobs import services
from apps.jobs.api.serializers import JobEventSerializer, JobSerializer
from apps.jobs.models import Job


class Command(BaseCommand):
    help = "Submit, list, show, cancel, retry jobs, and replay the dead-lettered ones."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", required=True)
        submit = commands.add_parser("submit", help="submit a job (validated as the API does)")
        submit.add_argument("kind")
        submit.add_argument("--payload", default="{}", help="the payload, as JSON")
        submit.add_argument("--owner", required=True, help="the username the job belongs to")
        submit.add_argument("--priority", choices=[p for p, _ in Job.Priority.choices])
        listing = commands.add_parser("list", help="the latest jobs")
        listing.add_argument("--status")
        listing.add_argument("--kind")
        listing.add_argument("--owner")
        listing.add_argument("--limit", type=int, default=20)
        for name, text in (("show", "a job and its timeline"), ("cancel", "cancel a job"), ("retry", "run again")):
            commands.add_parser(name, help=text).add_argument("id")
        replay = commands.add_parser("replay-dead", help="run the dead-lettered jobs again")
        replay.add_argument("--kind")
        replay.add_argument("--limit", type=int, default=100)
        for sub in commands.choices.values():
            sub.add_argument("--json", action="store_true", help="JSON for scripts")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            getattr(self, "_" + options["command"].replace("-", "_"))(options)
        except services.SubmissionRefused as exc:
            raise CommandError(f"refused: {json.dumps(exc.errors, default=str)}") from None
        except services.JobConflict as exc:
            raise CommandError(str(exc)) from None

    def _print(self, options: dict, data: Any, text: str) -> None:
        self.stdout.write(json.dumps(data, cls=DjangoJSONEncoder, indent=2) if options["json"] else text)

    def _job(self, job_id: str) -> Job:
        try:
            return Job.objects.get(pk=job_id)
        except (Job.DoesNotExist, ValidationError):
            raise CommandError(f"no job {job_id}") from None

    @staticmethod
    def _line(job: Job) -> str:
        error = f"  {job.error.get('message', '')[:60]}" if job.error else ""
        return (f"{job.pk}  {job.kind:11} {job.status:9} {job.priority:8} {job.progress:3}%  "
                f"attempt {job.attempts}/{job.max_attempts}  {job.created_at:%Y-%m-%d %H:%M:%S}{error}")  # fmt: skip

    def _submit(self, options: dict) -> None:
        try:
            payload = json.loads(options["payload"])
        except json.JSONDecodeError as exc:
            raise CommandError(f"--payload is not JSON: {exc}") from None
        data = {"kind": options["kind"], "payload": payload}
        if options["priority"]:
            data["priority"] = options["priority"]
        job, _ = services.submit_as(options["owner"], data)
        self._print(options, JobSerializer(job).data, str(job.pk))

    def _list(self, options: dict) -> None:
        jobs = Job.objects.select_related("owner").order_by("-created_at")
        for name in ("status", "kind"):
            if options[name]:
                jobs = jobs.filter(**{name: options[name]})
        if options["owner"]:
            jobs = jobs.filter(owner__username=options["owner"])
        found = list(jobs[: options["limit"]])
        self._print(options, JobSerializer(found, many=True).data, "\n".join(map(self._line, found)) or "no jobs")

    def _show(self, options: dict) -> None:
        job = self._job(options["id"])
        events = job.events.order_by("at")
        data = {**JobSerializer(job).data, "events": JobEventSerializer(events, many=True).data}
        lines = [self._line(job), f"payload: {json.dumps(data['payload'])[:500]}"]
        if job.result is not None:
            lines.append(f"result:  {json.dumps(job.result, cls=DjangoJSONEncoder)[:500]}")
        lines += [f"  {e.at:%H:%M:%S.%f}  {e.type:11} {e.message}" for e in events]
        self._print(options, data, "\n".join(lines))

    def _cancel(self, options: dict) -> None:
        job = services.cancel_job(self._job(options["id"]))
        self._print(options, JobSerializer(job).data, self._line(job))

    def _retry(self, options: dict) -> None:
        job = services.replay_job(self._job(options["id"]))
        self._print(options, JobSerializer(job).data, self._line(job))

    def _replay_dead(self, options: dict) -> None:
        dead = Job.objects.filter(dead_lettered=True).order_by("finished_at")
        if options["kind"]:
            dead = dead.filter(kind=options["kind"])
        replayed = []
        for job in dead[: options["limit"]]:
            try:
                replayed.append(services.replay_job(job))
            except services.JobConflict:
                continue  # replayed meanwhile
        self._print(options, [str(job.pk) for job in replayed], f"replayed {len(replayed)} job(s)")
