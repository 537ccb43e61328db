"""Runners with one interface: `infer(feed) -> outputs` (name -> numpy array)."""

from m3export.runners.base import Runner

__all__ = ["Runner"]
