"""Every name on the wire of a round, for both paths (docs/architecture.md, "One round").

Flower message types, the names of the records inside each message's RecordDict, the keys inside
those records, and the names a site keeps in its node state. The coordinator (server/) and the
site (client/) both import them from here; neither spells a key itself.

    coordinator -> site                          site -> coordinator
    query.check   CONFIG                         SITE (name, records, fingerprint, prepare:*)
                                                 [+ DECLINED]       (the site's policy refuses)
    train         CONFIG, ADAPTER                METRICS + UPDATE                 (plain)
                  [+ MASK_REQUEST]               METRICS + MASKED + UPLOAD        (secure)
                                                 or METRICS + DECLINED  (its policy or budget)

Under either DP level a site sends no counts: SITE holds name and fingerprint only, METRICS only
RECORD_EPSILON and RECORD_DELTA (record level) or nothing; a decline's METRICS is always empty.
    query.secagg_keys   SETUP                    ADVERT
    query.secagg_keys   SEED_REQUEST             SEED_REVEAL                      (SecAgg+)
    query.secagg_unmask SURVIVORS                SURVIVORS_SIGNED                 (consistency)
    query.secagg_unmask UNMASK_REQUEST           UNMASK_REPLY
"""

# -- Flower: query names (``@app.query(name)``) and the message types they answer ------------
CHECK_QUERY, KEYS_QUERY, UNMASK_QUERY = "check", "secagg_keys", "secagg_unmask"
CHECK, TRAIN = f"query.{CHECK_QUERY}", "train"
KEYS, UNMASK = f"query.{KEYS_QUERY}", f"query.{UNMASK_QUERY}"

# -- records, coordinator -> site -------------------------------------------------------------
CONFIG = "config"  # ConfigRecord: the resolved config tree (CONFIG_TREE) and the round's keys
ADAPTER = "adapter"  # ArrayRecord: the global adapter (PEFT state dict of the exchanged keys)
SETUP, MASK_REQUEST, UNMASK_REQUEST = "secagg-setup", "secagg-request", "secagg-unmask-request"
SURVIVORS = "secagg-survivors"  # the survivor lists to sign (query.secagg_unmask, first call)
SEED_REQUEST = "secagg-seed-request"  # SecAgg+: the committed adverts (query.secagg_keys, again)
DDG_PLAN = "secagg-noise-plan"  # distributed noise: the plan (common/privacy/ddg.py), with train

# -- records, site -> coordinator -------------------------------------------------------------
SITE = "site"  # ConfigRecord: preflight answer (counts only, never contents)
METRICS = "metrics"  # MetricRecord: NUM_EXAMPLES, privacy spent, losses where they may be shown
UPDATE = "update"  # ArrayRecord: the plain path's update (new adapter minus global)
MASKED, UPLOAD = "secagg-masked", "secagg-upload"  # the secure path's update, masked
DECLINED = "declined"  # ConfigRecord: NAME and REASON of a site that declines the round
ADVERT, UNMASK_REPLY = "secagg-advert", "secagg-unmask-reply"
SURVIVORS_SIGNED = "secagg-survivors-signed"  # a survivor's signature over SURVIVORS
SEED_REVEAL = "secagg-seed-reveal"  # SecAgg+: the site's graph-seed share, opening its commit
MASKED_ARRAY = "masked"  # the one array inside MASKED

# -- keys inside SETUP (besides the SecAggParams fields) -------------------------------------
SETUP_ROUND, SETUP_SITE_ID = "round", "site-id"
SESSION = "session"  # the run id: every secure-aggregation signature binds it
# Simulation only: the ephemeral identity the coordinator issues a virtual site (PEM bytes).
SIM_IDENTITY_KEY, SIM_IDENTITY_CERT, SIM_CA_CERT = "sim-identity-key", "sim-identity-cert", "sim-ca"

# -- keys inside CONFIG -----------------------------------------------------------------------
CONFIG_TREE = "fedtune-config"  # the whole resolved config as one JSON string
ROUND, FINGERPRINT, DATA_ROOT, RUN_ID = "round", "fingerprint", "data-root", "run-id"
WEIGHT = "secagg-weight"  # the site's public weight (secure path: it pre-multiplies)
HEAD_WHITENING = "head-whitening"  # `model.head_input = "whitened"`: the coordinator's map

# -- keys inside SITE and DECLINED ------------------------------------------------------------
NAME, RECORDS, REASON = "name", "records", "reason"
EVAL_RECORDS, MAX_TOKENS = "eval-records", "max-tokens"
PREPARE_PREFIX = "prepare:"  # SITE: data preparation counts per rule

# -- keys inside METRICS ----------------------------------------------------------------------
NUM_EXAMPLES = "num-examples"
TRAIN_LOSS, FIRST_LOSS, LAST_LOSS = "train-loss", "first-loss", "last-loss"
SITE_SECONDS = "site-seconds"
# A site's evaluation of the global model it received on its own held-out split
# (`data.eval_fraction`); sent only without DP and without secure aggregation.
SITE_EVAL_PREFIX = "site-eval-"  # + loss, accuracy, examples
EVALUATE = "evaluate"  # message type: the final global model, evaluated at each site
RECORD_EPSILON, RECORD_DELTA = "record-epsilon", "record-delta"
SECAGG_CLIPPED = "secagg-clipped"

# -- a site's node state (Flower's context.state), never sent ---------------------------------
STATE_SECAGG, STATE_PRIVACY = "secagg", "privacy"
STATE_IDENTITY = "secagg-identity"  # a site's own identity (IDENTITY_* keys), put there by the site

# -- a site's node config (its own settings; never sent) ---------------------------------------
IDENTITY_KEY, IDENTITY_CERT, CA_CERT = "identity-key", "identity-cert", "ca-cert"  # PEM files
