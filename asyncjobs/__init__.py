"""asyncjobs: durable background jobs inside your web app's own event loop."""

from __future__ import annotations

from asyncjobs._asgi import JobsMiddleware
from asyncjobs._errors import (
    AsyncJobsError,
    ConfigurationError,
    DataRefused,
    JobFailed,
    NotSerializable,
    PayloadTooLarge,
    Retry,
    RetryRefused,
    StoreError,
    TaskNotRegistered,
)
from asyncjobs._jobs import Jobs
from asyncjobs._models import Job, JobInfo, JobStatus
from asyncjobs._ratelimit import RateLimit
from asyncjobs._runner import JobContext, current_job
from asyncjobs._scheduler import ScheduleInfo
from asyncjobs._tasks import JobSpec, Task
from asyncjobs._workflows import Batch, BatchCounts, BatchProgress, Chain

__version__ = "0.1.0"

__all__ = [
    "AsyncJobsError",
    "Batch",
    "BatchCounts",
    "BatchProgress",
    "Chain",
    "ConfigurationError",
    "DataRefused",
    "Job",
    "JobContext",
    "JobFailed",
    "JobInfo",
    "JobSpec",
    "JobStatus",
    "Jobs",
    "JobsMiddleware",
    "NotSerializable",
    "PayloadTooLarge",
    "RateLimit",
    "Retry",
    "RetryRefused",
    "ScheduleInfo",
    "StoreError",
    "Task",
    "TaskNotRegistered",
    "__version__",
    "current_job",
]
