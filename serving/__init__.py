"""attnlm's serving app: Ray Serve + FastAPI over the shared core.

- `serving.engine`: model work without any web or Ray dependency (batched next-token and attention
  forwards, KV-cache completions with attention maps), on its parts:
  - `serving.params`: the engine's parameters, results and `EngineError`;
  - `serving.forwards`: many texts in few forwards (packed rows, length buckets);
  - `serving.attention_maps`: layer/head selection, mean, rollout, json/base64 encoding;
  - `serving.detok`: incremental detokenization, stop strings, logprobs;
  - `serving.decoder`: the thread that decodes completions in flight together;
  - `serving.sentence_probe`: the agreement probe on one sentence;
  - `serving.text`: what the API takes as text (surrogates, long texts, token-id prompts).
- `serving.limits`: every request limit and default, for the engine and the request models.
- `serving.schemas`: pydantic request models, OpenAI's error body.
- `serving.app_args`: the application's args, checked before any replica starts.
- `serving.settings`: the deployment's `user_config` (batching, in-flight bound).
- `serving.app`: the deployment (`serve run configs/serve.yaml`), on its HTTP parts:
  - `serving.http`: errors in OpenAI's body (a 500 with the request id), the ASGI middlewares;
  - `serving.auth`: optional API keys (`Authorization: Bearer`);
  - `serving.openapi`: response models and the contract /openapi.json serves.
- `serving.proxy`: a middleware for Ray Serve's proxy: 503 + Retry-After for a lost replica.
- `serving.show`: print an attention map from a running server in the terminal.
- `serving/static/index.html`: the attention viewer page served at `/`.
"""
