"""Pure protocol layer: message shapes, encode/decode, validation and error types. No I/O."""

from labmesh.protocol.errors import (
    BudgetExpiredError,
    ExecutorDeadError,
    LabmeshError,
    LeaseExpiredError,
    ParameterValueError,
    ProtocolError,
    RemoteError,
    ResourceAllocationError,
    ResourceLockedError,
    SerializationError,
    UnknownOperationError,
    UnknownParameterError,
    remote_error,
    remote_error_class,
    wire_type_of,
)

__all__ = [
    "BudgetExpiredError",
    "ExecutorDeadError",
    "LabmeshError",
    "LeaseExpiredError",
    "ParameterValueError",
    "ProtocolError",
    "RemoteError",
    "ResourceAllocationError",
    "ResourceLockedError",
    "SerializationError",
    "UnknownOperationError",
    "UnknownParameterError",
    "remote_error",
    "remote_error_class",
    "wire_type_of",
]
