"""Names on the wire of the three secure-aggregation stages (docs/secure-aggregation.md).

Shared by the site (client/secagg_site.py) and the coordinator (server/secagg_round.py): Flower
query identifiers and the record names inside each message's RecordDict.
"""

KEYS_QUERY, UNMASK_QUERY = "secagg_keys", "secagg_unmask"  # Flower: identifiers
SETUP, ADVERT, MASK_REQUEST = "secagg-setup", "secagg-advert", "secagg-request"
MASKED, UPLOAD, UNMASK_REQUEST, UNMASK_REPLY = (
    "secagg-masked",
    "secagg-upload",
    "secagg-unmask-request",
    "secagg-unmask-reply",
)
STATE_KEY, WEIGHT_KEY = "secagg", "secagg-weight"
