"""Option types the `baton` commands share, so each is spelled and checked one way."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated

import typer


class Output(StrEnum):
    """How a command prints its result: for people (`text`: streamed text, tables) or for
    programs (`json`)."""

    text = "text"
    json = "json"


OutputOpt = Annotated[Output, typer.Option(
    "--output", "-o", help="text for people (streamed text, tables) or json for programs")]
