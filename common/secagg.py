"""Secure aggregation: the server learns the sum of a cohort's updates, never one of them.

The protocol is SecAgg (Bonawitz et al. 2017, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning") over the whole cohort or, with a neighbour count k, SecAgg+
(Bell et al. 2020) over each device's k neighbours on a random ring (``neighbourhoods``), built
from Flower's own primitives (``flwr.common.secure_aggregation``: Shamir sharing, ECDH + HKDF +
Fernet, stochastic quantization; ``flwr.supercore.primitives.asymmetric``: P-384 keys). One
round, device u ("other devices" are u's neighbours; t-of-n counts within u's neighbourhood):

1. **setup**: two key pairs, one to encrypt what it sends other devices through the server, one
   to agree a pairwise mask seed ``s_uv`` with each other device v;
2. **share keys**: a self-mask seed ``b_u``; ``b_u`` and the mask private key (its scalar) split into t-of-n
   Shamir shares, one per device, each encrypted for its holder (the server only routes
   ciphertexts) and a hash of ``b_u``, so a wrong reconstruction is caught;
3. **masked input**: its update, quantized to integers, plus ``PRG(b_u)`` plus ``+PRG(s_uv)``
   for every v above it and ``-PRG(s_uv)`` for every v below it, modulo 2**64: the pairwise masks
   cancel in the sum, and the self-mask hides the input even when a pairwise key is revealed;
4. **unmask**: every survivor sends its share of ``b_u`` for each device whose input arrived and
   its share of the mask key for each device that dropped out after step 2. With t shares the
   server removes the self-masks and the dropped devices' pairwise masks: it then holds the sum.

Fewer than t survivors: nothing can be reconstructed and the round ends with nothing revealed.
A malformed share makes a reconstruction fail its check (the hash, or the public key the mask
key must match); the server tries other t-subsets of the shares before it gives up.

Where Flower's own code is not used as is, and why: its PRG folds a 32-byte seed to 32 bits
(``pseudo_rand_gen``), so masks are drawn here from PCG64 seeded with all 256 bits; its
modulus is configurable, here arithmetic is uint64 wrap-around (mod 2**64), so no sum can
overflow for any cohort below 2**40 devices.
"""
from __future__ import annotations

import base64
import hashlib
import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .errors import ConfigError

# Quantization levels over [-clip_range, clip_range]: a step of about 1e-6 at a range of 8.
TARGET_RANGE = 1 << 24
# How far from 0 an element of a clipped, noised update may lie, in noise stds beyond C: past 8
# stds a Gaussian lands with odds of about 1e-15, so the clamp below almost never bites.
CLAMP_STDS = 8.0
# A reconstruction from more shares than the threshold tries at most this many t-subsets.
MAX_SUBSETS = 256


class SecAggError(ConfigError):
    """A secure-aggregation message that breaks the protocol (the device declines it)."""


def threshold_for(cohort: int, fraction: float) -> int:
    """Shares needed to reconstruct a secret in a cohort of ``cohort`` devices: ``ceil(fraction *
    cohort)``, at least 2 (a sum over one device is that device's update) and at most the cohort."""
    if not 0 < fraction <= 1:
        raise ConfigError(f"secure-aggregation threshold must be a fraction in (0, 1], got {fraction}")
    return min(cohort, max(2, math.ceil(fraction * cohort)))


def check_degree(degree: int) -> None:
    """ConfigError unless ``degree`` is 0 (every device a neighbour of every other) or even and >= 2."""
    if isinstance(degree, bool) or not isinstance(degree, int) or degree < 0 or degree == 1 or degree % 2:
        raise ConfigError("secure-aggregation-neighbours must be 0 (every device masks with every other) or an "
                          f"even number >= 2 (half on either side of a ring), got {degree!r}")


def neighbourhoods(cohort: Sequence[int], degree: int, rng: random.Random) -> dict[int, list[int]]:
    """Who masks with and holds shares for whom: each device's neighbourhood, itself included, sorted.

    SecAgg+'s graph (Bell et al. 2020, "Secure Single-Server Aggregation with (Poly)Logarithmic
    Overhead"): the cohort in a random order around a ring, each device joined to the ``degree / 2``
    nearest on either side, so every neighbourhood has ``degree + 1`` devices and the relation is
    symmetric (a pairwise mask needs both ends). Degree 0, or one that reaches round the ring, joins
    every device to every other (SecAgg's complete graph).
    """
    check_degree(degree)
    nodes = list(cohort)
    if degree == 0 or degree >= len(nodes) - 1:
        return {n: sorted(nodes) for n in nodes}
    ring = nodes[:]
    rng.shuffle(ring)
    half, n = degree // 2, len(ring)
    return {ring[i]: sorted(ring[(i + d) % n] for d in range(-half, half + 1)) for i in range(n)}


def clamp_range(clip_norm: float, noise_std: float, bit_std: float | None) -> float:
    """The quantizer's range: a clipped update's element is within C, its noise within 8 stds;
    the clip bit (adaptive clipping) within [0, 1] and 8 of its stds."""
    bound = clip_norm + CLAMP_STDS * noise_std
    if bit_std is not None:
        bound = max(bound, 1.0 + CLAMP_STDS * bit_std)
    return float(bound)


# ---- keys ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyPair:
    private: bytes     # PEM; never leaves the device except as Shamir shares
    public: bytes      # PEM

    @classmethod
    def new(cls) -> "KeyPair":
        from flwr.supercore.primitives.asymmetric import generate_key_pairs, private_key_to_bytes, public_key_to_bytes
        sk, pk = generate_key_pairs()
        return cls(private_key_to_bytes(sk), public_key_to_bytes(pk))


def public_key_of(private: bytes) -> bytes | None:
    """The PEM public key of a PEM private key; None for bytes that are not one."""
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, public_key_to_bytes
    try:
        return public_key_to_bytes(bytes_to_private_key(private).public_key())
    except (ValueError, TypeError):
        return None


def private_scalar(private: bytes) -> bytes:
    """The 48-byte secret scalar of a PEM P-384 private key: what is shared, a quarter of the PEM's
    size, so its shares travel and rebuild four times faster."""
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key
    return bytes_to_private_key(private).private_numbers().private_value.to_bytes(48, "big")


def private_from_scalar(scalar: bytes) -> bytes | None:
    """The PEM private key of a rebuilt scalar; None when the bytes are no P-384 scalar."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import private_key_to_bytes
    try:
        return private_key_to_bytes(ec.derive_private_key(int.from_bytes(scalar, "big"), ec.SECP384R1()))
    except (ValueError, TypeError):
        return None


def is_public_key(public: bytes) -> bool:
    """Whether ``public`` is a PEM P-384 public key (what every device's keys must be)."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from flwr.supercore.primitives.asymmetric import bytes_to_public_key
    try:
        key = bytes_to_public_key(public)
    except (ValueError, TypeError):
        return False
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP384R1)


def _agreed(private: bytes, public: bytes) -> bytes:
    """ECDH + HKDF-SHA256: the 32-byte key two devices agree (as Flower derives it, base64)."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.supercore.primitives.asymmetric import bytes_to_private_key, bytes_to_public_key
    try:
        return generate_shared_key(bytes_to_private_key(private), bytes_to_public_key(public))
    except (ValueError, TypeError) as exc:
        raise SecAggError(f"not a usable P-384 key: {exc}") from None


def mask_seed(private: bytes, public: bytes) -> bytes:
    """The pairwise mask seed ``s_uv``, the same from either side."""
    return base64.urlsafe_b64decode(_agreed(private, public))


def commitment(secret: bytes) -> bytes:
    return hashlib.sha256(secret).digest()


# ---- shares ----------------------------------------------------------------------------------


def split(secret: bytes, threshold: int, holders: int) -> list[bytes]:
    """``holders`` Shamir shares of ``secret``, any ``threshold`` of which rebuild it."""
    from flwr.common.secure_aggregation.crypto.shamir import create_shares
    return create_shares(secret, threshold, holders)


def seal(private: bytes, peer_public: bytes, src: int, dst: int, seed_share: bytes, key_share: bytes) -> bytes:
    """The two shares ``src`` gives ``dst``, encrypted so that only ``dst`` reads them."""
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import encrypt
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_concat
    return encrypt(_agreed(private, peer_public), share_keys_plaintext_concat(src, dst, seed_share, key_share))


def unseal(private: bytes, peer_public: bytes, src: int, dst: int, ciphertext: bytes) -> tuple[bytes, bytes]:
    """(seed share, key share) from ``src``'s ciphertext; ``SecAggError`` if it is not exactly that."""
    from cryptography.fernet import InvalidToken
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import decrypt
    from flwr.common.secure_aggregation.secaggplus_utils import share_keys_plaintext_separate
    try:
        plain = decrypt(_agreed(private, peer_public), ciphertext)
    except (InvalidToken, TypeError, ValueError):
        raise SecAggError(f"the shares from node {src} do not decrypt") from None
    got_src, got_dst, seed_share, key_share = share_keys_plaintext_separate(plain)
    if (got_src, got_dst) != (src, dst):
        raise SecAggError(f"the shares routed from node {src} to {dst} say {got_src} to {got_dst}")
    return seed_share, key_share


def reconstruct(shares: Sequence[bytes], threshold: int, check: Callable[[bytes], bool],
                rng: random.Random | None = None) -> bytes | None:
    """The secret that ``threshold`` of ``shares`` rebuild and ``check`` accepts, or None.

    Shares that are not bytes of the common length are dropped first. A share that is
    well-formed but wrong makes every subset holding it rebuild garbage, which ``check``
    refuses; other subsets are then tried (all of them when there are at most
    ``MAX_SUBSETS``, otherwise that many drawn at random).
    """
    from flwr.common.secure_aggregation.crypto.shamir import combine_shares
    usable = [s for s in shares if isinstance(s, bytes) and len(s) >= 20 and (len(s) - 4) % 16 == 0]
    lengths = [len(s) for s in usable]
    if lengths:
        common = max(set(lengths), key=lengths.count)
        usable = [s for s in usable if len(s) == common]
    by_index: dict[bytes, bytes] = {}
    for s in usable:   # one share per Shamir index: a repeated index cannot be interpolated
        by_index.setdefault(s[:4], s)
    usable = list(by_index.values())
    if len(usable) < threshold:
        return None
    n_subsets = math.comb(len(usable), threshold)
    if n_subsets <= MAX_SUBSETS:
        subsets = itertools.combinations(usable, threshold)
    else:
        rng = rng or random.Random()
        subsets = (rng.sample(usable, threshold) for _ in range(MAX_SUBSETS))
    for subset in subsets:
        try:
            secret = combine_shares(list(subset))
        except (ValueError, TypeError):
            continue
        if check(secret):
            return secret
    return None


# ---- masks and quantization ------------------------------------------------------------------


def prg(seed: bytes, size: int) -> np.ndarray:
    """``size`` uniform uint64 words from a 32-byte seed (all of its 256 bits)."""
    state = np.random.SeedSequence(int.from_bytes(seed, "little"))
    return np.random.Generator(np.random.PCG64(state)).bit_generator.random_raw(size)


def pairwise_mask(own: int, other: int, seed: bytes, size: int) -> np.ndarray:
    """What ``own`` adds for its pair with ``other`` (mod 2**64): +PRG above, -PRG below, so the
    pair's two masks cancel in the sum."""
    mask = prg(seed, size)
    return mask if own < other else (np.uint64(0) - mask)


def quantize(vector: np.ndarray, clip_range: float) -> np.ndarray:
    """Flower's stochastic quantization of ``vector`` (clamped to ``[-clip_range, clip_range]``)
    into integers in ``[0, TARGET_RANGE]``, as uint64 words; unbiased."""
    from flwr.common.secure_aggregation.quantization import quantize as flower_quantize
    return flower_quantize([np.asarray(vector, dtype=np.float64)], clip_range, TARGET_RANGE)[0].astype(np.uint64)


def dequantize_sum(total: np.ndarray, clip_range: float, count: int) -> np.ndarray:
    """The float sum of ``count`` vectors from the sum of their quantized words (undoes the
    ``+clip_range`` shift each of them carried)."""
    return total.astype(np.float64) * (2.0 * clip_range / TARGET_RANGE) - clip_range * count


def in_range(total: np.ndarray, count: int) -> bool:
    """Whether ``total`` can be the sum of ``count`` quantized words (each at most TARGET_RANGE):
    a device that sent anything else corrupts it beyond repair."""
    return bool(np.all(total <= np.uint64(count * TARGET_RANGE)))


# ---- what travels: the trained entries at their global shapes, then the clip bit --------------


@dataclass(frozen=True)
class Layout:
    """The order of the elements in a secure vector. Every device pads its width slice to the
    global shapes, so all vectors align; entries a device did not train are zeros there."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    with_bit: bool

    @classmethod
    def of(cls, global_shapes: Mapping[str, tuple[int, ...]], trained: set[str] | frozenset[str],
           with_bit: bool) -> "Layout":
        names = tuple(n for n in global_shapes if n in trained)
        return cls(names, tuple(tuple(global_shapes[n]) for n in names), with_bit)

    @property
    def sizes(self) -> list[int]:
        return [math.prod(s) for s in self.shapes]

    @property
    def size(self) -> int:
        return sum(self.sizes) + int(self.with_bit)

    def flatten(self, padded: Mapping[str, np.ndarray], bit: float | None) -> np.ndarray:
        parts = [np.asarray(padded[n], dtype=np.float64).reshape(-1) for n in self.names]
        if self.with_bit:
            parts.append(np.array([0.0 if bit is None else bit]))
        return np.concatenate(parts) if parts else np.zeros(0)

    def unflatten(self, vector: np.ndarray) -> tuple[dict[str, np.ndarray], float | None]:
        out, at = {}, 0
        for name, shape, size in zip(self.names, self.shapes, self.sizes):
            out[name] = vector[at:at + size].reshape(shape)
            at += size
        return out, (float(vector[at]) if self.with_bit else None)
