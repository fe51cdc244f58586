"""Compatibility with the systems labmesh serves without change: PLESTY and LAPLACE-LHC.

- `labmesh.compat.plesty`: PLESTY's session rules (a connect without lease or token holds its
  locks until its connection closes), used by the server core.
- `labmesh.compat.laplace`: the LAPLACE-LHC envelope served on a device server's socket
  (`LaplaceAdapter`), the ServerLHC-style `LaplaceServer`, and the PyQt6 signal bridge.

Compatibility code talks to the server through one narrow interface, documented in
docs/server.md ("What compatibility code may use"), never through private attributes.
"""
