"""Device layer: the driver contract (Device, Parameter, @operation) and the executors."""

from labmesh.device.base import Device, OperationSpec, describe_device, find_operations, operation
from labmesh.device.executor import (
    DedicatedThreadExecutor,
    Executor,
    Job,
    SerializedPoolExecutor,
    make_executor,
)
from labmesh.device.parameters import Parameter

__all__ = [
    "DedicatedThreadExecutor",
    "Device",
    "Executor",
    "Job",
    "OperationSpec",
    "Parameter",
    "SerializedPoolExecutor",
    "describe_device",
    "find_operations",
    "make_executor",
    "operation",
]
