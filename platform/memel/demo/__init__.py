"""The CPU demo: one small LM trained with and without inhibition, compared side by side."""

from .run import DemoResult, run_demo

__all__ = ["DemoResult", "run_demo"]
