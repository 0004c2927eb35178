"""toolq wire protocol: the models and Redis keys shared by producers and workers.

This package is the only code the producer and the worker share.
"""

from . import lua
from .keys import (
    GROUP,
    LATENCY_BUCKETS_MS,
    TRAJ_ID_PATTERN,
    InvalidIdError,
    Keys,
    check_part,
    check_traj_id,
    latency_field,
)
from .models import (
    BG_FINAL_STATUSES,
    BG_STATUSES,
    CLOSED_REASON,
    DEFAULT_IMAGE,
    FINAL_STATUSES,
    INFRA_ERROR_CODES,
    PROTOCOL_VERSION,
    BgTask,
    CallEntry,
    ErrorCode,
    Event,
    Limits,
    OpenRequest,
    Policy,
    Result,
    SnapshotArgs,
    SnapshotInfo,
    ToolInfo,
    TrajectoryRecord,
    TrajectorySpec,
    TrajStatus,
    WireModel,
    WorkerInfo,
)

__version__ = "0.1.0"

__all__ = [
    "BG_FINAL_STATUSES",
    "BG_STATUSES",
    "CLOSED_REASON",
    "DEFAULT_IMAGE",
    "FINAL_STATUSES",
    "GROUP",
    "INFRA_ERROR_CODES",
    "LATENCY_BUCKETS_MS",
    "PROTOCOL_VERSION",
    "TRAJ_ID_PATTERN",
    "BgTask",
    "CallEntry",
    "ErrorCode",
    "Event",
    "InvalidIdError",
    "Keys",
    "Limits",
    "OpenRequest",
    "Policy",
    "Result",
    "SnapshotArgs",
    "SnapshotInfo",
    "ToolInfo",
    "TrajStatus",
    "TrajectoryRecord",
    "TrajectorySpec",
    "WireModel",
    "WorkerInfo",
    "__version__",
    "check_part",
    "check_traj_id",
    "latency_field",
    "lua",
]
