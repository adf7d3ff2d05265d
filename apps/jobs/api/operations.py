"""What operators read: `/api/stats/` (staff) and `/metrics` (Prometheus, behind a token or basic
auth). Both read the statistics of `apps.jobs.stats`, never the whole job table."""

import base64
import hmac
from typing import Any

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from rest_framework.authtoken.models import Token
from rest_framework.decorators import api_view, permission_classes
from rest_framework.permissions import IsAdminUser
from rest_framework.request import Request
from rest_framework.response import Response

from apps.jobs import stats, workers
from apps.jobs.models import JobTiming, JobTotal


@extend_schema(responses={200: OpenApiTypes.OBJECT})
@api_view(["GET"])
@permission_classes([IsAdminUser])
def stats_view(request: Request) -> Response:
    """Queues (depth over every priority, oldest waiting job), unfinished jobs, jobs finished in the
    last hour and day by status and kind, throughput per minute, p50/p95 queue wait and run time by
    kind, live workers and what they consume, dead letters waiting."""
    return Response(stats.snapshot())


class _Collector:
    """The metrics, read when scraped."""

    def collect(self) -> Any:
        queues = stats.queues()
        depth = GaugeMetricFamily(
            "conveyor_queue_depth", "Messages waiting in the broker, all priorities", labels=["queue"]
        )
        oldest = GaugeMetricFamily(
            "conveyor_queue_oldest_waiting_seconds", "Age of the oldest queued job", labels=["queue"]
        )
        for name, queue in queues.items():
            if queue["depth"] is not None:
                depth.add_metric([name], queue["depth"])
            oldest.add_metric([name], queue["oldest_waiting_seconds"])
        yield depth
        yield oldest
        unfinished = GaugeMetricFamily(
            "conveyor_jobs", "Unfinished jobs by status and queue", labels=["status", "queue"]
        )
        for (status, queue), n in sorted(stats.unfinished().items()):
            unfinished.add_metric([status, queue], n)
        yield unfinished
        finished = CounterMetricFamily("conveyor_jobs_finished", "Finished jobs", labels=["kind", "status"])
        attempts = CounterMetricFamily("conveyor_job_attempts", "Attempts of finished jobs", labels=["kind"])
        retries = CounterMetricFamily("conveyor_job_retries", "Attempts after the first", labels=["kind"])
        by_kind: dict[str, list[int]] = {}
        for total in JobTotal.objects.order_by("kind", "status"):
            finished.add_metric([total.kind, total.status], total.jobs)
            sums = by_kind.setdefault(total.kind, [0, 0])
            sums[0] += total.attempts
            sums[1] += max(0, total.attempts - total.jobs)
        for kind, (tries, again) in by_kind.items():
            attempts.add_metric([kind], tries)
            retries.add_metric([kind], again)
        yield finished
        yield attempts
        yield retries
        yield GaugeMetricFamily("conveyor_dead_letters", "Dead-lettered jobs waiting", value=stats.dead_letters())
        yield from _histograms()
        actions = CounterMetricFamily("conveyor_reconciler_actions", "What the reconciler did", labels=["action"])
        for action, n in sorted(stats.reconciler_totals().items()):
            actions.add_metric([action], n)
        yield actions
        lost = stats.reconciler_totals().get("recovered", 0)
        yield CounterMetricFamily("conveyor_lease_losses", "Running jobs whose lease ran out", value=lost)
        yield GaugeMetricFamily("conveyor_workers", "Live workers", value=len(workers.alive()))
        pruned = CounterMetricFamily("conveyor_pruned", "What retention removed", labels=["what"])
        for what, n in sorted(stats.pruned_totals().items()):
            pruned.add_metric([what], n)
        yield pruned


# The histograms' bounds on /metrics, the same for every kind and every scrape (Prometheus adds up
# buckets by their `le`): 1 ms to about 17 minutes, doubling. The roll-up's buckets are four times finer.
BOUNDS = list(range(0, 21))  # 2**k milliseconds


def _histograms() -> Any:
    rows = JobTiming.objects.filter(hour=stats.ALL_TIME).order_by("kind", "metric", "bucket")
    grouped: dict[tuple[str, str], list[tuple[int, int]]] = {}
    for row in rows:
        grouped.setdefault((row.kind, row.metric), []).append((row.bucket, row.jobs))
    families = {
        "wait": HistogramMetricFamily("conveyor_job_queue_wait_seconds", "Queued to started", labels=["kind"]),
        "run": HistogramMetricFamily("conveyor_job_run_seconds", "Started to finished", labels=["kind"]),
    }
    for (kind, metric), buckets in grouped.items():
        total = sum(n * stats.bucket_upper(bucket) for bucket, n in buckets)  # an upper bound of the sum
        out = [
            (f"{2**k / 1000:.6g}", sum(n for bucket, n in buckets if bucket <= stats.BUCKETS_PER_DOUBLING * k))
            for k in BOUNDS
        ]
        out.append(("+Inf", sum(n for _, n in buckets)))
        families[metric].add_metric([kind], out, sum_value=total)
    yield from families.values()


def _authorized(request: HttpRequest) -> bool:
    header = request.headers.get("Authorization", "")
    scheme, _, credentials = header.partition(" ")
    scheme = scheme.lower()
    if scheme == "bearer" and settings.METRICS_TOKEN:
        return hmac.compare_digest(credentials.encode(), settings.METRICS_TOKEN.encode())
    if scheme == "basic" and settings.METRICS_BASIC_AUTH:
        try:
            given = base64.b64decode(credentials, validate=True)
        except ValueError:
            return False
        return hmac.compare_digest(given, settings.METRICS_BASIC_AUTH.encode())
    if scheme == "token" and credentials:
        return Token.objects.filter(key=credentials, user__is_staff=True, user__is_active=True).exists()
    return False


def metrics(request: HttpRequest) -> HttpResponse:
    """Prometheus text. 401 without a METRICS_TOKEN bearer, METRICS_BASIC_AUTH, or a staff API token."""
    if not _authorized(request):
        response = HttpResponse("authentication required\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Basic realm="metrics"'
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return HttpResponse(generate_latest(registry), content_type="text/plain; version=0.0.4; charset=utf-8")
