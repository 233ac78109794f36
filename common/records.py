"""Conversions between fedser values and Flower records (pairs with round-trip tests).

Only model arrays travel in an ArrayRecord and only scalars in Config/MetricRecords;
``arrays_to_record`` refuses anything that is not a named float32 array.
"""
from __future__ import annotations

import json

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord

from .errors import ConfigError
from .features import FeatureSpec
from .models import ModelConfig
from . import keys


def arrays_to_record(arrays: dict[str, np.ndarray]) -> ArrayRecord:
    bad = [k for k, v in arrays.items() if not isinstance(v, np.ndarray) or v.dtype != np.float32]
    if bad:
        raise ConfigError(f"only float32 model arrays may be sent; not: {', '.join(bad)}")
    # np.ascontiguousarray makes 0-d arrays 1-d; the reshape keeps every shape as it was.
    return ArrayRecord({k: Array(np.ascontiguousarray(v).reshape(v.shape)) for k, v in arrays.items()})


def record_to_arrays(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def model_to_config(model_config: ModelConfig, spec: FeatureSpec) -> dict[str, str | int]:
    return {keys.PROTOCOL: keys.PROTOCOL_VERSION, keys.MODEL_CONFIG: json.dumps(model_config.to_dict()),
            keys.FEATURE_SPEC: json.dumps(spec.to_dict())}


def model_from_config(config: ConfigRecord | dict) -> tuple[ModelConfig, FeatureSpec]:
    """The model and features an instruction describes; ``ConfigError`` for one this side cannot use."""
    check_protocol(config)
    missing = [k for k in (keys.MODEL_CONFIG, keys.FEATURE_SPEC) if k not in config]
    if missing:
        raise ConfigError(f"instruction lacks {', '.join(missing)}")
    return (ModelConfig.from_dict(json.loads(str(config[keys.MODEL_CONFIG]))),
            FeatureSpec.from_dict(json.loads(str(config[keys.FEATURE_SPEC]))))


def check_protocol(config: ConfigRecord | dict) -> None:
    """``ConfigError`` unless ``config`` was written by a fedser of this side's protocol version."""
    theirs = config.get(keys.PROTOCOL) if hasattr(config, "get") else None
    if theirs is None:
        raise ConfigError(f"instruction carries no {keys.PROTOCOL} (a fedser older than protocol "
                          f"{keys.PROTOCOL_VERSION}): update the server to this device's fedser version")
    try:
        theirs = int(theirs)
    except (TypeError, ValueError):
        raise ConfigError(f"{keys.PROTOCOL} {theirs!r}: expected an integer") from None
    if theirs != keys.PROTOCOL_VERSION:
        newer = "server" if theirs > keys.PROTOCOL_VERSION else "device"
        raise ConfigError(f"the server speaks fedser protocol {theirs}, this device {keys.PROTOCOL_VERSION}: "
                          f"the {newer} runs the newer fedser; update the other side to the same version")
