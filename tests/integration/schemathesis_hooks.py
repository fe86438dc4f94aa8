"""schemathesis hooks of tests/integration/test_contract.py (SCHEMATHESIS_HOOKS names this module).

One check, `valid_data_accepted`, stands in for the built-in `positive_data_acceptance` (a
request valid by the schema gets a 2xx, a 401/404, ...): it also accepts a 400 whose code says
the rejection depends on the text itself, which no JSON schema can state: a text over the
context window in tokens (`context_length_exceeded`), a sentence in which the probe finds no
subject or verb (`probe_failed`), values each in bounds that do not go together
(`conflicting_parameters`: `best_of` < `n`, `min_tokens` > `max_tokens`, `max_tokens` 0
without `echo`, `best_of` with `stream`), which JSON Schema cannot relate, an attention
answer over the server's byte limit for the text's length (`answer_too_large`), and
attention `rows` past the text's end (`out_of_range` on `rows`). Any other 400 for a valid
request fails.
"""

from __future__ import annotations

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

TEXT_DEPENDENT = {
    "context_length_exceeded",
    "probe_failed",
    "conflicting_parameters",
    "answer_too_large",
}


@schemathesis.check
def valid_data_accepted(ctx, response, case):
    if response.status_code == 400:
        try:
            code, param = response.json()["error"]["code"], response.json()["error"]["param"]
        except (ValueError, KeyError, TypeError):
            code = param = None
        if code in TEXT_DEPENDENT or (code == "out_of_range" and param == "rows"):
            return None
    return positive_data_acceptance(ctx, response, case)
