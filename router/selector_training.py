"""Training the selector's prior from performance history (Redis, or a JSONL file of records).

Every finished request with its features is an example, whoever picked its method (the selector
or the request itself): (request features, pool load, candidate) -> log decode tokens/s.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from baton.errors import InvalidRequestError
from baton.records import PerfRecord
from baton.router.features import RequestFeatures
from baton.router.speed_model import (
    LOAD_FEATURES,
    Candidate,
    SpeedModel,
    TrainingSettings,
    inputs,
)

log = logging.getLogger(__name__)

# Fewer usable records than this train no model: the selector keeps what it has.
MIN_RECORDS = 32


class NotEnoughHistory(InvalidRequestError):
    """Too few usable records to train on."""


def candidate_of(rec: PerfRecord) -> Candidate:
    return Candidate(rec.method, rec.pool or "default", rec.k, rec.quantization)


def usable(rec: PerfRecord) -> bool:
    """A record the prior can learn from: features present and a decode speed."""
    if not rec.decode_tokens_per_s or rec.output_tokens < 2:
        return False
    try:
        RequestFeatures.from_dict(rec.features)
    except KeyError:
        return False
    return True


def training_rows(records: Iterable[PerfRecord]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(inputs, log decode tokens/s, pools) of the usable records."""
    recs = [r for r in records if usable(r)]
    pools = sorted({r.pool or "default" for r in recs})
    x, y = [], []
    for r in recs:
        feats = RequestFeatures.from_dict(r.features)
        load = [r.features.get(name, 0.0) for name in LOAD_FEATURES]
        x.append(inputs(feats.vector(), load, candidate_of(r), pools))
        y.append(math.log(r.decode_tokens_per_s or 1.0))
    return np.array(x, dtype=np.float32), np.array(y, dtype=np.float32), pools


def train(records: Iterable[PerfRecord], settings: TrainingSettings | None = None,
          min_records: int = MIN_RECORDS) -> SpeedModel:
    """A prior trained on `records`; raises `NotEnoughHistory` below `min_records`."""
    x, y, pools = training_rows(records)
    if len(x) < min_records:
        raise NotEnoughHistory(
            f"{len(x)} usable performance records (with features and at least 2 output tokens); "
            f"training needs {min_records}: serve more requests first, or train --from a file")
    model = SpeedModel.fit(x, y, pools, settings)
    log.info("trained a selector model on %d records (%d pools); train RMSE %.3f log tok/s",
             len(x), len(pools), model.info.train_rmse)
    return model


def read_records(path: str | Path) -> list[PerfRecord]:
    """PerfRecords from a JSONL file, one per line; raises `InvalidRequestError` on a bad line."""
    out = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                out.append(PerfRecord.model_validate(json.loads(line)))
            except (ValueError, TypeError) as exc:
                raise InvalidRequestError(f"{path}:{i}: not a performance record ({exc})") from exc
    return out
