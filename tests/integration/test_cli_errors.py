"""Every newcomer mistake gets one clear line: a table of bad `attnlm` invocations, each run as the
real command in its own process, asserting its exit code, the words of its one error line (the
last line of stderr), and that no traceback reaches stderr.

Rows stop before training starts (at parse, config or data time), so each costs about the
process's start-up (torch and Lightning imports, ~6 s of CPU): the selected rows run two at a
time, each test waiting for its own. The default run takes one row per way of failing; rows
marked slow (`make test-slow`) add the other instances of those (more sizes, files, builders).
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from tests.integration.helpers import REPO, attnlm_command, clean_env

TINY = str(REPO / "configs" / "tiny.yaml")
DOCS = [f"The cat number {i} sat on the mat and looked at the dog." for i in range(200)]
BAD_OFFSET = len(("\n".join(DOCS[:100]) + "\n").encode()) + len(b"bad ")  # in not-utf8.txt
ROW_TIMEOUT_S = 90


@dataclass(frozen=True)
class Row:
    """One bad invocation: `args` ({files}: the folder of prepared files; {run}: the row's own
    folder, its working directory), the exit code, and a regular expression that the error line
    must match (searched)."""

    id: str
    args: tuple[str, ...]
    code: int
    line: str
    env: dict[str, str] = field(default_factory=dict)
    max_seconds: float | None = None  # a bound on the wall time, where speed is the point
    slow: bool = False  # a code path another row covers too: kept for `make test-slow`


def fit(*args: str) -> tuple[str, ...]:
    return ("fit", "--config", TINY, "--data.cache_dir", "{run}/cache", *args)


def text_data(builder: str, name: str, *more: str) -> tuple[str, ...]:
    return fit("--data.dataset", builder, "--data.data_files", f"{{files}}/{name}", *more)


NOT_A_CHECKPOINT = r"is not an attnlm checkpoint \(a file written by `attnlm fit`, a zip archive from torch\.save\): "
# the Hub online, but at a loopback port nobody listens on (never the network, never a proxy)
NO_HUB = {
    "HF_HUB_OFFLINE": "0",
    "HF_DATASETS_OFFLINE": "0",
    "NO_PROXY": "127.0.0.1",
    "no_proxy": "127.0.0.1",
}

ROWS = [
    # --- flags and settings (issue 15) ---
    Row("max-steps-negative", fit("--trainer.max_steps", "-5"), 1,
        r"^attnlm fit: error: `max_steps` must be a non-negative integer or -1"),
    Row("two-block-sizes", fit("--model.block_size", "32", "--data.block_size", "64"), 1,
        r"data\.block_size \(64\) exceeds the model's context model\.block_size \(32\); the context length is one setting"),
    Row("n-head-3", fit("--model.n_head", "3"), 1, r"n_embd \(128\) must be divisible by n_head \(3\)", slow=True),
    Row("zero-layers", fit("--model.n_layer", "0"), 1, r"n_layer must be a positive integer", slow=True),
    Row("negative-batch", fit("--data.batch_size", "-1"), 1,
        r"^attnlm fit: error: invalid data settings: data\.batch_size: must be an int >= 1, got -1$"),
    Row("vocab-too-small", fit("--data.vocab_size", "100"), 1, r"data\.vocab_size: must be an int >= 257", slow=True),
    Row("zero-devices", fit("--trainer.accelerator", "cpu", "--trainer.devices", "0"), 1,
        r"^attnlm fit: error: `Trainer\(devices='0'\)` value is not a valid input", slow=True),
    Row("more-devices-than-the-machine", fit("--trainer.accelerator", "gpu", "--trainer.devices", "64"), 1,
        r"^attnlm fit: error: (No supported gpu backend found|You requested gpu: .* But your machine only has)"),
    Row("bad-strategy", fit("--trainer.strategy", "bogus"), 1, r"invalid strategy name: `strategy='bogus'`", slow=True),
    Row("bad-precision", fit("--trainer.precision", "bf17"), 2,
        r"^attnlm fit: error: trainer\.precision: got bf17; expected .*'bf16-mixed'"),
    Row("unknown-key", fit("--model.n_experts", "4"), 2,
        r"^attnlm fit: error: unrecognized arguments: --model\.n_experts 4 \(`attnlm fit --help` lists"),
    Row("wrong-type", fit("--model.n_layer", "two"), 2, r"^attnlm fit: error: model\.n_layer: expected int\. Got value: two"),
    Row("missing-config-file", ("fit", "--config", "{files}/nowhere.yaml"), 2,
        r"^attnlm fit: error: config: File does not exist: .*nowhere\.yaml"),
    Row("bad-yaml", ("fit", "--config", "{files}/bad.yaml"), 1,
        r"^attnlm fit: error: config file .*bad\.yaml is not valid YAML: .* at line 3, column 1$"),
    Row("unknown-command", ("frobnicate",), 2, r"^attnlm: error: unknown command 'frobnicate'; the commands are fit", slow=True),
    Row("bad-launcher", ("fit", "--launcher", "slurm", "--config", TINY), 1, r"--launcher must be one of lightning, ray", slow=True),
    Row("ckpt-path-not-a-checkpoint", fit("--ckpt_path", "{files}/junk.ckpt"), 1,
        NOT_A_CHECKPOINT + r"it is not a zip archive \(it starts with b'hello\\n'\)$"),
    Row("ckpt-path-truncated", fit("--ckpt_path", "{files}/truncated.ckpt"), 1, NOT_A_CHECKPOINT + "it is truncated", slow=True),
    Row("export-not-a-checkpoint", ("export", "--checkpoint", "{files}/junk.ckpt", "--out", "{run}/out"), 1,
        r"^attnlm export: error: .*junk\.ckpt " + NOT_A_CHECKPOINT + "it is not a zip archive"),
    Row("export-empty-file", ("export", "--checkpoint", "{files}/empty.ckpt", "--out", "{run}/out"), 1,
        NOT_A_CHECKPOINT + r"it is empty \(0 bytes\)$", slow=True),
    Row("generate-no-artifact", ("generate", "--artifact", "{files}/nowhere", "--prompt", "The cat"), 1,
        r"^attnlm generate: error: artifact folder not found", slow=True),
    # --- the data a user brings (issue 21) ---
    Row("missing-data-file", text_data("text", "nowhere.txt"), 1, r"data\.data_files: no such file: .*nowhere\.txt", slow=True),
    Row("glob-matches-nothing", text_data("text", "*.nothing"), 1, r"data\.data_files: no file matches", slow=True),
    Row("not-utf8", text_data("text", "not-utf8.txt"), 1,
        rf"not-utf8\.txt is not valid utf-8 text: undecodable byte\(s\) ff fe at line 101, byte offset {BAD_OFFSET}\. "
        r"Give the file's encoding with --data\.encoding .* --data\.decode_errors replace .* or skip"),
    Row("lone-c3", text_data("text", "lone-c3.txt"), 1, r"lone-c3\.txt is not valid utf-8 text: undecodable byte\(s\) c3 at line 2,", slow=True),
    Row("empty-file", text_data("text", "empty.txt"), 1, r"data\.data_files: .*empty\.txt has no text \(it is empty"),
    Row("blank-lines", text_data("text", "blank.txt"), 1, r"blank\.txt has no text \(it is empty or holds only blank lines\)", slow=True),
    Row("json-without-text-field", text_data("json", "no-text.jsonl"), 1,
        r"data\.text_column: no column 'text'; the dataset has \['body', 'id'\]", slow=True),
    Row("json-malformed-line", text_data("json", "malformed.jsonl"), 1,
        r"malformed\.jsonl line 3 is not valid JSON \(Expecting value, column 10\)"),
    Row("json-not-utf8", text_data("json", "not-utf8.jsonl"), 1, r"not-utf8\.jsonl is not valid utf-8 text: .* at line 2,", slow=True),
    Row("json-empty-strings", text_data("json", "empty-strings.jsonl"), 1,
        r"the 'train' split has no text: column 'text' is empty in every one of its 20 documents"),
    Row("csv-not-utf8", text_data("csv", "latin.csv"), 1, r"latin\.csv is not valid utf-8 text: undecodable byte\(s\) e9 at line 3,"),
    Row("parquet-empty", text_data("parquet", "empty.parquet"), 1, r"empty\.parquet has no text", slow=True),
    Row("unknown-encoding", text_data("text", "not-utf8.txt", "--data.encoding", "klingon"), 1,
        r"data\.encoding: 'klingon' is not a text encoding Python knows", slow=True),
    Row("unknown-decode-errors", text_data("text", "not-utf8.txt", "--data.decode_errors", "ignore"), 1,
        r"data\.decode_errors: must be one of strict, replace, skip, got 'ignore'", slow=True),
    Row("hub-offline", fit("--data.dataset", "wikitext", "--data.dataset_config", "wikitext-2-raw-v1"), 1,
        r"data\.dataset: 'wikitext' is not in the local cache .* HF_HUB_OFFLINE=1 keeps the Hugging Face Hub out of reach"),
    Row("hub-unreachable", fit("--data.dataset", "wikitext", "--data.dataset_config", "wikitext-2-raw-v1"), 1,
        r"'wikitext' is not a local builder or folder, so it comes from the Hugging Face Hub, which did not "
        r"answer at http://127\.0\.0\.1:\d+ .*set HF_HUB_OFFLINE=1; or train on local files: --data\.dataset text",
        env={**NO_HUB, "HF_ENDPOINT": "http://127.0.0.1:{closed_port}"}, max_seconds=40),
]  # fmt: skip


def prepare_files(root: Path) -> None:
    """The files the rows name: corpora with faults, checkpoints that are not, a bad config."""

    def lines(docs: list[str]) -> bytes:
        return ("\n".join(docs) + "\n").encode()

    (root / "not-utf8.txt").write_bytes(
        lines(DOCS[:100]) + b"bad \xff\xfe here\n" + lines(DOCS[100:])
    )
    (root / "lone-c3.txt").write_bytes(lines(DOCS[:1]) + b"lone \xc3\n" + lines(DOCS[1:]))
    (root / "empty.txt").write_bytes(b"")
    (root / "blank.txt").write_text("\n\n   \n\t\n")
    jsonl = [json.dumps({"text": d}) for d in DOCS]
    (root / "no-text.jsonl").write_text(
        "".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(DOCS))
    )
    (root / "malformed.jsonl").write_text(
        "\n".join([*jsonl[:2], '{"text": oops}', *jsonl[2:]]) + "\n"
    )
    (root / "not-utf8.jsonl").write_bytes(
        lines(jsonl[:1]) + b'{"text": "caf\xe9"}\n' + lines(jsonl[1:])
    )
    (root / "empty-strings.jsonl").write_text(
        "".join(json.dumps({"text": ""}) + "\n" for _ in range(20))
    )
    (root / "latin.csv").write_bytes(
        b"text\n" + lines(DOCS[:1]) + "café\n".encode("latin-1") + lines(DOCS[1:])
    )
    (root / "empty.parquet").write_bytes(b"")
    (root / "bad.yaml").write_text("trainer:\n  max_steps: [1\n")
    (root / "junk.ckpt").write_text("hello\n")
    (root / "empty.ckpt").write_bytes(b"")
    whole = root / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}, "hyper_parameters": {}}, whole)
    (root / "truncated.ckpt").write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])


def closed_port() -> int:
    """A loopback port nobody listens on: a Hub that refuses at once, never the network."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Outcome:
    code: int
    stderr: str
    seconds: float


def run_row(row: Row, files: Path, run: Path) -> Outcome:
    port = str(closed_port())
    args = [a.replace("{files}", str(files)).replace("{run}", str(run)) for a in row.args]
    env = {**clean_env(), **{k: v.replace("{closed_port}", port) for k, v in row.env.items()}}
    env.pop("ATTNLM_DEBUG", None)
    start = time.perf_counter()
    proc = subprocess.run(
        attnlm_command(*args),
        cwd=run,  # relative paths (runs/default) land in the row's own folder
        env=env,
        capture_output=True,
        text=True,
        timeout=ROW_TIMEOUT_S,
    )
    return Outcome(proc.returncode, proc.stderr, time.perf_counter() - start)


class Runner:
    """Runs the rows this session selected, two processes at a time, each once."""

    def __init__(self, files: Path, runs: Path, selected: list[Row]) -> None:
        self.files, self.runs = files, runs
        self.selected = selected
        self.pool = ThreadPoolExecutor(max_workers=2)
        self.futures: dict[str, Future] = {}
        self.lock = threading.Lock()

    def _submit(self, row: Row) -> None:
        run = self.runs / row.id
        run.mkdir()
        self.futures[row.id] = self.pool.submit(run_row, row, self.files, run)

    def result(self, row: Row) -> Outcome:
        with self.lock:
            if row.id not in self.futures:
                self._submit(row)
                for other in self.selected:  # the rest in the background
                    if other.id not in self.futures:
                        self._submit(other)
        return self.futures[row.id].result()


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    files = tmp_path_factory.mktemp("bad-files")
    prepare_files(files)
    selected = [
        item.callspec.params["row"]
        for item in request.session.items
        if getattr(item, "originalname", None) == "test_a_bad_invocation_is_one_clear_line"
    ]
    runner = Runner(files, tmp_path_factory.mktemp("bad-runs"), selected)
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


@pytest.mark.parametrize(
    "row",
    [pytest.param(row, id=row.id, marks=[pytest.mark.slow] if row.slow else []) for row in ROWS],
)
def test_a_bad_invocation_is_one_clear_line(runner, row):
    outcome = runner.result(row)
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert "Traceback" not in outcome.stderr, outcome.stderr[-3000:]
    assert lines, "nothing on stderr"
    assert outcome.code == row.code, outcome.stderr[-3000:]
    assert re.search(row.line, lines[-1]), f"last line: {lines[-1]!r}"
    if row.max_seconds is not None:
        assert outcome.seconds < row.max_seconds
