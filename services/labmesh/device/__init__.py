"""Device layer: the driver contract (Device, Parameter, @operation) and how calls are run."""

from labmesh.device.base import Device, OperationSpec, describe_device, find_operations, operation
from labmesh.device.executor import TAKEOVER_AFTER_S, Job, Watchdog
from labmesh.device.parameters import Parameter

__all__ = [
    "TAKEOVER_AFTER_S",
    "Device",
    "Job",
    "OperationSpec",
    "Parameter",
    "Watchdog",
    "describe_device",
    "find_operations",
    "operation",
]
