"""Acceleration methods a request can ask for, by name (torch-free: the router checks them too).

Lossless methods give exactly the tokens of `none` under greedy decoding and the same distribution
under sampling. `auto` leaves the choice to the router; an engine given `auto` decodes plainly.
"""

from __future__ import annotations

NONE = "none"
AUTO = "auto"
# Methods that need nothing beyond the model itself.
BUILTIN_METHODS = ("none", "ngram", "lookahead", "layerskip")
# Methods that need a file (a draft model, trained heads) named in the worker's config.
FILE_METHODS = ("draft", "medusa")
METHODS = (*BUILTIN_METHODS, *FILE_METHODS)
REQUEST_METHODS = (AUTO, *METHODS)
# The most draft tokens one request may verify in one step.
MAX_SPECULATIVE_TOKENS = 16
