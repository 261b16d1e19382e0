"""Keys and quotas: who may call, and how much. The HTTP layer talks to it only through `Gatekeeper`.

Contract used by the routes (gateway/api/*):

    principal = await gatekeeper.authenticate(request)            # raises APIError 401/403
    grant = await gatekeeper.admit(principal, model, reserve_tokens)  # raises APIError 429/503
    ... run the request; grant.headers go on the response ...
    await grant.settle(prompt_tokens, completion_tokens)           # exactly once, also on error/disconnect

`reserve_tokens` is prompt tokens + max completion tokens: the worst case, reserved before the call
and refunded down to the real use in `settle`.
"""

from gateway.quota.gatekeeper import ANONYMOUS, Gatekeeper, Grant, Principal, check_settings
from gateway.quota.keys import KeyLimits, KeyRecord

__all__ = ["ANONYMOUS", "Gatekeeper", "Grant", "KeyLimits", "KeyRecord", "Principal", "check_settings"]
