from collections.abc import Callable
from typing import Any

from apps.jobs.models import Job

# report(percent, message): a handler's progress.
Report = Callable[[float, str], None]
# handle(job, report) -> result: what every kind's module provides.
Handler = Callable[[Job, Report], Any]
