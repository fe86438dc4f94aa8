"""Print an attention map from a running server as a terminal heatmap (no browser needed).

    python -m serving.show --url http://127.0.0.1:8000 \
        --text "The cat that was sitting on the mat which was next to the dog jumps." --layer -1

Rows are query tokens, columns the tokens they attend to (mean over heads unless --head is given);
darker glyphs are larger weights. Below the map, each token's most-attended earlier token.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request

SHADES = " .:-=+*#%@"


def fetch(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as err:
        body = json.loads(err.read() or b"{}")
        raise SystemExit(
            f"server answered {err.code}: {body.get('error', {}).get('message', body)}"
        ) from err


def render(tokens: list[str], matrix: list[list[float]]) -> str:
    labels = [t.replace("\n", "\\n") or "∅" for t in tokens]
    width = max(len(label) for label in labels)
    lines = []
    for label, row in zip(labels, matrix, strict=True):
        peak = max(row) or 1.0
        cells = "".join(
            SHADES[min(len(SHADES) - 1, int(w / peak * (len(SHADES) - 1) + 0.5))] * 2 for w in row
        )
        lines.append(f"{label:>{width}} |{cells}|")
    lines.append("")
    for i, (label, row) in enumerate(zip(labels, matrix, strict=True)):
        if i == 0:
            continue
        j = max(range(i), key=lambda k: row[k])  # most attended earlier token
        lines.append(f"{label:>{width}} -> {labels[j]!r} ({row[j]:.2f})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument(
        "--text", default="The cat that was sitting on the mat which was next to the dog jumps."
    )
    parser.add_argument(
        "--layer", type=int, default=-1, help="layer index; negative counts from the end"
    )
    parser.add_argument(
        "--head", type=int, default=None, help="one head (default: mean over heads)"
    )
    args = parser.parse_args(argv)
    n_layers = fetch(f"{args.url}/v1/attention", {"text": "a", "layers": [0], "heads": [0]})[
        "n_layers"
    ]
    layer = args.layer % n_layers
    payload = {"text": args.text, "layers": [layer], "decimals": 3}
    if args.head is None:
        payload["aggregation"] = "mean"
    else:
        payload["heads"] = [args.head]
    body = fetch(f"{args.url}/v1/attention", payload)
    data = body["attention"]["data"][0]
    matrix = data if args.head is None else data[0]
    what = "mean over heads" if args.head is None else f"head {args.head}"
    print(f"attention of {body['model']}, layer {layer} of {body['n_layers']}, {what}:")
    print(render(body["tokens"], matrix))
    return 0


if __name__ == "__main__":
    sys.exit(main())
