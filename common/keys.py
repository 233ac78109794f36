"""Message keys and the constants shared by the ServerApp and the ClientApp, so the two sides cannot drift."""

from .errors import ConfigError

# ArrayRecord / ConfigRecord / MetricRecord names inside a Message's RecordDict.
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"

# The version of what travels between the two sides (these keys, their meaning, the model and
# feature configs). A device and a server of different protocol versions do not work together:
# the device declines every instruction with a reason that says which side to update.
PROTOCOL = "fedser-protocol"
PROTOCOL_VERSION = 1

# Config sent by the server with every train / evaluate instruction.
SERVER_ROUND = "server-round"
MODEL_VERSION = "model-version"
KWS_HEAD_VERSION = "kws-head-version"
TIER = "tier"
LOCAL_EPOCHS = "local-epochs"
BATCH_SIZE = "batch-size"
LEARNING_RATE = "learning-rate"
CLIP_NORM = "clip-norm"               # user-level update clipping bound C
NOISE_MULTIPLIER = "noise-multiplier"  # user-level noise multiplier z
NOISE_MODE = "noise-mode"             # "local" | "distributed" | "none"
EXPECTED_CLIENTS = "expected-clients"  # m, for distributed noise z*C/sqrt(m)
# Adaptive clipping: the std of the noise a device adds to its bit "update norm <= C" (present in an
# instruction only when the run adapts C), and the noised bit in its reply.
CLIP_COUNT_STD = "clip-count-std"
CLIP_BIT = "clip-bit"
# Secure aggregation (``fedser.common.secagg``). Its setup, share-keys and unmask stages are query
# instructions carrying SECAGG_STAGE; the masked input is the train instruction's reply.
SECAGG_STAGE = "secagg-stage"
SECAGG_STAGES = ("setup", "share-keys", "unmask")
SECAGG_NODES = "secagg-nodes"             # the cohort (setup), the devices whose keys follow (share-keys)
SECAGG_THRESHOLD = "secagg-threshold"     # t: shares that rebuild a secret
SECAGG_CLIP_RANGE = "secagg-clip-range"   # the quantizer's range this round
SECAGG_ENC_KEYS = "secagg-enc-keys"       # public keys that encrypt shares, in SECAGG_NODES order
SECAGG_MASK_KEYS = "secagg-mask-keys"     # public keys that agree pairwise masks, same order
SECAGG_SEED_HASH = "secagg-seed-hash"     # sha256 of a device's self-mask seed
SECAGG_SRCS = "secagg-srcs"               # senders of the ciphertexts that follow
SECAGG_DSTS = "secagg-dsts"               # addressees of the ciphertexts that follow
SECAGG_CIPHERTEXTS = "secagg-ciphertexts"
SECAGG_ACTIVE = "secagg-active"           # devices whose masked input arrived (unmask)
SECAGG_DEAD = "secagg-dead"               # devices that shared keys but sent no masked input
SECAGG_SHARES = "secagg-shares"           # unmask reply: shares, in SECAGG_ACTIVE + SECAGG_DEAD order
SECAGG = "secagg"                         # the ConfigRecord of a stage's reply
MASKED = "masked"                         # the masked input's array (uint64)
DP_ENABLED = "dp"                     # sample-level DP-SGD on devices
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"  # floor of the DP-SGD noise; devices calibrate above it
ROUNDS_LEFT = "rounds-left"           # rounds still planned, this one included (budget calibration)
DP_MAX_GRAD_NORM = "dp-max-grad-norm"
TRAIN_SCOPE = "train-scope"           # what devices train: "all" | "norms" (+ heads) | "heads"
TRAIN_SCOPES = ("all", "norms", "heads")
MODEL_CONFIG = "model-config"         # JSON of the ModelConfig
FEATURE_SPEC = "feature-spec"         # JSON of the FeatureSpec

# Metrics a client replies with.
NUM_EXAMPLES = "num-examples"
LOSS = "loss"
EPSILON = "epsilon"                   # sample-level epsilon spent so far (ledger)
DELTA = "delta"
HEADS = "heads"                       # bit mask of heads trained (see HEAD_BITS)
LOCAL_STEPS = "local-steps"
WALL_TIME = "wall-time"
DECLINED = "declined"                 # 1 when the device did not train
ACCURACY = "accuracy"
UAR = "uar"

TASKS = ("emotion", "kws")            # the model's heads, in this order everywhere
HEAD_BITS = {"emotion": 1, "kws": 2}
TIERS = (1.0, 0.5, 0.25)              # width tiers: the fraction of every hidden layer a device trains
NOISE_MODES = ("local", "distributed", "none")   # values of NOISE_MODE
# A device that clips to exactly C can land a float32 rounding step above it: norms are
# compared against their bound with this relative slack (``fedser.common.privacy.exceeds_bound``).
NORM_RTOL = 1e-5


def heads_to_mask(heads: set[str] | list[str] | tuple[str, ...]) -> int:
    return sum(HEAD_BITS[h] for h in heads)


def mask_to_heads(mask: int) -> list[str]:
    return [h for h, bit in HEAD_BITS.items() if int(mask) & bit]

# Error codes a device uses to decline an instruction (Message error replies).
DECLINE_BUDGET = 601       # the next round would exceed the device's privacy budget
DECLINE_NO_DATA = 602      # no usable local data (empty or entirely corrupt folder)
DECLINE_BAD_INSTRUCTION = 603  # model version / config the device cannot use
DECLINE_POLICY = 604       # the instruction falls outside the device owner's privacy policy
DECLINE_CODES = {DECLINE_BUDGET: "privacy budget", DECLINE_NO_DATA: "no data",
                 DECLINE_BAD_INSTRUCTION: "bad instruction", DECLINE_POLICY: "privacy policy"}


def parse_tiers(text: str) -> list[float]:
    """``"1.0,0.5,0.25"`` -> ``[1.0, 0.5, 0.25]``; ``ConfigError`` unless each is one of ``TIERS``.

    Devices take these in turn: device (or partition) ``i`` runs ``tiers[i % len(tiers)]``.
    """
    try:
        tiers = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ConfigError(f"{text!r}: expected width tiers like 1.0,0.5,0.25") from None
    bad = [t for t in tiers if t not in TIERS]
    if not tiers or bad:
        allowed = ", ".join(map(str, TIERS[:-1])) + f" or {TIERS[-1]}"
        raise ConfigError(f"{text!r}: each tier must be {allowed}")
    return tiers
