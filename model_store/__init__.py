"""fmgate's model store: sources → measured, compressed variants → the artifact an engine loads."""

from .errors import StoreError
from .store import Artifact, Gate, ModelStore, default_home

__all__ = ["Artifact", "Gate", "ModelStore", "StoreError", "default_home"]
