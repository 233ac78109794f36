"""Conversions between fedser values and Flower records (pairs with round-trip tests).

Only model arrays travel in an ArrayRecord and only scalars in Config/MetricRecords;
``arrays_to_record`` refuses anything that is not a named float32 array. ``decode_array``
reads an Array that came from the other side without believing what its bytes claim.
"""
from __future__ import annotations

import io
import json
import math

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord
from flwr.common.constant import SType

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
    """Every array of a record this side trusts (its own, or one already checked).

    ``Array.numpy()`` believes the npy header: a header that claims 2**45 elements allocates
    them. Arrays from the other side go through :func:`decode_array` instead.
    """
    return {k: v.numpy() for k, v in record.items()}


# npy headers are a few hundred bytes; np.save pads them to 64-byte multiples.
_MAX_NPY_HEADER = 4096
_NPY_READERS = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}


def decode_array(array: object, shape: tuple[int, ...], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """The numpy array an untrusted ``Array`` carries, decoded only once it is known to be ``shape`` x ``dtype``.

    The declared serialization type, dtype and shape, the npy header inside the bytes and the
    byte length (header plus ``prod(shape) * itemsize``) must all agree with what the receiver
    expects before anything is decoded, so a header that claims a huge array never allocates
    it and empty or truncated bytes are a reason, not an ``EOFError``. The result is a copy
    (writable, independent of the message).

    Raises:
        ValueError: naming what disagrees (for the sender to fix, for the receiver to log).
    """
    want_shape, want = tuple(int(d) for d in shape), np.dtype(dtype)
    if not isinstance(array, Array):
        raise ValueError(f"is a {type(array).__name__}, not a flwr Array")
    if array.stype != SType.NUMPY:
        raise ValueError(f"has serialization type {array.stype!r}; expected {SType.NUMPY!r} (np.save bytes)")
    if array.dtype != want.name:
        raise ValueError(f"has dtype {array.dtype}; expected {want.name}")
    declared = array.shape
    if not (isinstance(declared, (tuple, list)) and all(isinstance(d, int) for d in declared)):
        raise ValueError(f"declares shape {declared!r}; expected a tuple of integers {want_shape}")
    if tuple(declared) != want_shape:
        raise ValueError(f"has shape {tuple(declared)}; expected {want_shape}")
    data = array.data
    if not isinstance(data, bytes):
        raise ValueError(f"carries {type(data).__name__} data; expected bytes")
    count = math.prod(want_shape)
    payload = count * want.itemsize
    if not payload < len(data) <= payload + _MAX_NPY_HEADER:
        raise ValueError(f"carries {len(data)} bytes; a {want_shape} {want.name} array is {payload} bytes "
                         f"after an npy header of at most {_MAX_NPY_HEADER}")
    fp = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(fp)
        reader = _NPY_READERS.get(version)
        if reader is None:
            raise ValueError(f"npy format version {version} (expected 1.0 or 2.0)")
        header_shape, fortran_order, header_dtype = reader(fp)
    except Exception as exc:  # numpy's header parser on untrusted bytes: any failure means malformed
        raise ValueError(f"npy header cannot be read: {exc}") from None
    if tuple(header_shape) != want_shape or header_dtype != want:
        raise ValueError(f"npy header says shape {tuple(header_shape)} dtype {header_dtype}; "
                         f"the Array declares {want_shape} {want.name}")
    offset = fp.tell()
    if len(data) - offset != payload:
        raise ValueError(f"carries {len(data) - offset} bytes after its npy header; "
                         f"a {want_shape} {want.name} array is {payload}")
    flat = np.frombuffer(data, dtype=want, count=count, offset=offset)
    return flat.reshape(want_shape, order="F" if fortran_order else "C").copy()


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
