"""The method selector's prior: a predictor of a candidate's decode speed for a request.

A small ensemble of torch MLPs maps (request features, load on the candidate's pool, the
candidate) to log decode tokens/s. It is trained across every task the cluster has served, on
features that carry over between tasks (how much the prompt repeats itself, how code-like it is,
its length, sampling, load) rather than on what task it is, so a family never seen before gets a
zero-shot prediction. Members are trained on bootstrap resamples: their spread is the model's
uncertainty, which the selector's Thompson sampling draws from.

Serialized with `torch.save` (tensors and plain data only) and loaded with `weights_only=True`,
so a model read from Redis can never run code.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from baton.speculation import METHODS

QUANTIZATIONS = ("int8", "int4")
# Load on the candidate's pool as the router sees it when it picks.
LOAD_FEATURES = ("log_pool_in_flight", "pool_kv_usage", "log_pool_waiting")
NO_LOAD = (0.0,) * len(LOAD_FEATURES)
Load = tuple[float, ...]  # a pool's LOAD_FEATURES


def load_features(load: Sequence[float]) -> dict[str, float]:
    """A pool's load as a record's features."""
    return dict(zip(LOAD_FEATURES, load, strict=True))


@dataclass(frozen=True, slots=True)
class Candidate:
    """One way to serve a request: a method (with its draft length k, None: adaptive) on a pool.

    `quantization` is the pool's weight format (None: full precision); a quantized pool is a lossy
    candidate, eligible only for requests that allow it.
    """

    method: str
    pool: str = "default"
    k: int | None = None
    quantization: str | None = None

    @property
    def lossy(self) -> bool:
        return self.quantization is not None

    @property
    def name(self) -> str:
        k = f":k={self.k}" if self.k is not None else ""
        return f"{self.method}{k}@{self.pool}"


def encode(candidate: Candidate, pools: Sequence[str]) -> list[float]:
    """The candidate's part of a predictor input."""
    out = [float(candidate.method == m) for m in METHODS]
    out += [float(candidate.quantization == q) for q in QUANTIZATIONS]
    out.append(0.0 if candidate.k is None else candidate.k / 8.0)
    out += [float(candidate.pool == p) for p in pools]
    return out


def inputs(request: Sequence[float], load: Sequence[float], candidate: Candidate,
           pools: Sequence[str]) -> list[float]:
    return [*request, *load, *encode(candidate, pools)]


@dataclass(slots=True)
class TrainingSettings:
    members: int = 5
    hidden: int = 64
    steps: int = 400
    lr: float = 3e-3
    weight_decay: float = 1e-3
    seed: int = 0


@dataclass(slots=True)
class ModelInfo:
    """What a trained model is: stored with it."""

    version: int = 0
    trained_at: float = field(default_factory=time.time)
    records: int = 0
    pools: list[str] = field(default_factory=list)
    train_rmse: float = 0.0  # in log tokens/s, on its own training data


def _mlp(n_in: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                         nn.Linear(hidden, 1))


class SpeedModel:
    """An ensemble predicting log decode tokens/s; `predict` gives each member's prediction."""

    def __init__(self, members: list[nn.Sequential], mean: torch.Tensor, std: torch.Tensor,
                 info: ModelInfo):
        self.members = members
        self.mean, self.std = mean, std
        self.info = info
        for m in members:
            m.eval()
        # The members' weights stacked for numpy: a prediction per request costs tens of
        # microseconds this way, against hundreds through torch modules.
        layers = [[layer for layer in m if isinstance(layer, nn.Linear)] for m in members]
        self._w = [np.stack([ls[i].weight.detach().numpy().T for ls in layers])
                   for i in range(len(layers[0]))]
        self._b = [np.stack([ls[i].bias.detach().numpy() for ls in layers])[:, None, :]
                   for i in range(len(layers[0]))]
        self._mean, self._std = mean.numpy(), std.numpy()

    @property
    def pools(self) -> list[str]:
        return self.info.pools

    @property
    def n_inputs(self) -> int:
        return int(self.mean.numel())

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, pools: Sequence[str],
            settings: TrainingSettings | None = None) -> SpeedModel:
        """Train on inputs `x` (rows from `inputs`) and targets `y` (log tokens/s)."""
        s = settings or TrainingSettings()
        if len(x) == 0:
            raise ValueError("no training rows")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # a net this small trains fastest on one core, beside serving
        try:
            return cls._fit(x, y, pools, s)
        finally:
            torch.set_num_threads(threads)

    @classmethod
    def _fit(cls, x: np.ndarray, y: np.ndarray, pools: Sequence[str],
             s: TrainingSettings) -> SpeedModel:
        gen = torch.Generator().manual_seed(s.seed)
        torch.manual_seed(s.seed)
        xt = torch.as_tensor(x, dtype=torch.float32)
        yt = torch.as_tensor(y, dtype=torch.float32).reshape(-1, 1)
        mean, std = xt.mean(0), xt.std(0, unbiased=False).clamp_min(1e-3)
        xn = (xt - mean) / std
        members = []
        for _ in range(s.members):
            idx = torch.randint(len(xn), (len(xn),), generator=gen)  # bootstrap resample
            net = _mlp(xn.shape[1], s.hidden)
            out_layer = net[-1]
            assert isinstance(out_layer, nn.Linear)
            with torch.no_grad():  # start at the mean speed: the net learns the differences
                out_layer.bias.fill_(float(yt.mean()))
            opt = torch.optim.AdamW(net.parameters(), lr=s.lr, weight_decay=s.weight_decay)
            for _ in range(s.steps):
                opt.zero_grad()
                loss = nn.functional.mse_loss(net(xn[idx]), yt[idx])
                loss.backward()
                opt.step()
            members.append(net)
        model = cls(members, mean, std, ModelInfo(records=len(x), pools=list(pools)))
        pred = model.predict(np.asarray(x)).mean(0)
        model.info.train_rmse = float(math.sqrt(float(((pred - np.asarray(y)) ** 2).mean())))
        return model

    def predict(self, x: np.ndarray) -> np.ndarray:
        """(members, rows) predictions of log tokens/s."""
        h = ((np.asarray(x, dtype=np.float32) - self._mean) / self._std)[None]
        last = len(self._w) - 1
        for i, (w, b) in enumerate(zip(self._w, self._b, strict=True)):
            h = h @ w + b
            if i < last:
                h = h * 0.5 * (1 + np.tanh(0.5 * h))  # SiLU: h * sigmoid(h), overflow-free
        return h[:, :, 0]

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        torch.save({"members": [m.state_dict() for m in self.members], "mean": self.mean,
                    "std": self.std, "hidden": _width(self.members[0]),
                    "info": {"version": self.info.version, "trained_at": self.info.trained_at,
                             "records": self.info.records, "pools": self.info.pools,
                             "train_rmse": self.info.train_rmse}}, buf)
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> SpeedModel:
        """Inverse of `to_bytes`; raises ValueError on anything that is not such a model."""
        try:
            obj = torch.load(io.BytesIO(data), weights_only=True)
            members = []
            for sd in obj["members"]:
                net = _mlp(int(obj["mean"].numel()), int(obj["hidden"]))
                net.load_state_dict(sd)
                members.append(net)
            return cls(members, obj["mean"], obj["std"], ModelInfo(**obj["info"]))
        except Exception as exc:  # noqa: BLE001 - whatever is wrong with the bytes
            raise ValueError(f"not a Baton speed model: {exc}") from exc


def _width(net: nn.Sequential) -> int:
    first = net[0]
    assert isinstance(first, nn.Linear)
    return first.out_features

