"""Baton: distributed LLM serving on Ray.

The shared pieces live here: request and sampling types, typed errors and logging set-up. The
engine is `baton.actors.Engine`; everything heavy is imported lazily so `import baton` stays cheap.
"""

from importlib.metadata import version

from baton.errors import BatonError
from baton.sampling import SamplingParams

__all__ = ["BatonError", "SamplingParams", "__version__"]
__version__ = version("baton")  # the installed distribution's, as pyproject.toml gives it
