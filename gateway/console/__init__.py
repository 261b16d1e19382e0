"""The web console for the box's owner: models, keys, live metrics and a playground, at /console."""

from .router import router

__all__ = ["router"]
