"""attnlm's serving app: Ray Serve + FastAPI over the shared core.

- `serving.engine`: model work without any web or Ray dependency (batched next-token and attention
  forwards, KV-cache completions with attention maps, rollout, encodings).
- `serving.schemas`: pydantic request models, OpenAI's error body.
- `serving.app`: the deployment (`serve run configs/serve.yaml`).
- `serving.show`: print an attention map from a running server in the terminal.
- `serving/static/index.html`: the attention viewer page served at `/`.
"""
