"""serving.forwards: how texts share forwards (packed rows, length buckets) and that each text's
logits and map are those of its own forward."""

import pytest
import torch

from attnlm.config import GPTConfig
from attnlm.networks import build_model
from serving.forwards import TextForwards, length_buckets, pack_rows

VOCAB = 300  # the tokenizer's; the model's is padded past it


def forwards_and_rows(arch: str) -> tuple[TextForwards, list[list[int]]]:
    """TextForwards over a small seeded model of `arch` and six texts of 1-30 tokens."""
    torch.manual_seed(0)
    heads = 2 if arch == "transformer" else 1
    config = GPTConfig(
        vocab_size=VOCAB + 3, block_size=32, n_layer=2, n_head=heads, n_embd=16, arch=arch
    )
    model = build_model(config).eval()
    forwards = TextForwards(model, VOCAB, max_context=32, device=torch.device("cpu"))
    return forwards, [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 17, 3, 9, 30, 1)]


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_batches_place_every_row_once_with_its_own_logits(arch):
    forwards, rows = forwards_and_rows(arch)
    seen, starts, forwards_run = [], [], 0
    with torch.no_grad():
        for placements, out in forwards.batches(rows, return_attention=arch == "transformer"):
            forwards_run += 1
            assert out.logits.size(-1) == VOCAB
            for i, r, s in placements:
                seen.append(i)
                starts.append(s)
                n = len(rows[i])
                alone = forwards.padded([rows[i]], return_attention=arch == "transformer")
                torch.testing.assert_close(
                    out.logits[r, s : s + n], alone.logits[0], atol=1e-5, rtol=1e-4
                )
                if arch == "transformer":
                    torch.testing.assert_close(
                        out.attention[:, r, :, s : s + n, s : s + n],
                        alone.attention[:, 0],
                        atol=1e-5,
                        rtol=1e-4,
                    )
    assert sorted(seen) == list(range(len(rows)))
    if arch == "transformer":  # one forward, texts side by side in its rows
        assert forwards_run == 1 and any(s > 0 for s in starts)
    else:  # right-padded length buckets, each text from position 0
        assert forwards_run > 1 and set(starts) == {0}


@pytest.mark.parametrize("arch", ["transformer", "lstm"])
def test_last_logits_are_each_texts_last_position_alone(arch, monkeypatch):
    """Each text's next-token logits are those of its last position in a forward of its own;
    packed rows of an attention model run the output head on those positions only."""
    forwards, rows = forwards_and_rows(arch)
    model = forwards.model
    head_rows = []
    head = model.lm_head.forward
    monkeypatch.setattr(model.lm_head, "forward", lambda x: head_rows.append(x.shape) or head(x))
    with torch.no_grad():
        got = forwards.last_logits(rows)
        assert got.shape == (len(rows), VOCAB) and got.dtype == torch.float32
        if arch == "transformer":
            assert head_rows == [(len(rows), model.config.n_embd)]  # one position a text
        for i, ids in enumerate(rows):
            alone = forwards.padded([ids]).logits[0, -1]
            torch.testing.assert_close(got[i], alone, atol=1e-5, rtol=1e-4)


def test_logits_at_is_the_full_forwards_logits_there():
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=1, n_head=2, n_embd=16))
    idx = torch.randint(0, VOCAB, (3, 16))
    at = torch.tensor([[0, 15], [2, 3], [1, 0], [2, 3]])
    with torch.no_grad():
        full = model.eval()(idx).logits
        torch.testing.assert_close(model(idx, logits_at=at).logits, full[at[:, 0], at[:, 1]])
    with pytest.raises(ValueError, match="without targets"):
        model(idx, targets=idx, logits_at=at)


def test_length_buckets_bound_padding_and_cover_every_row():
    lengths = [4, 27, 5, 26, 12, 13, 4, 25]
    buckets = length_buckets(lengths, max_padding=0.2)
    assert sorted(i for b in buckets for i in b) == list(range(len(lengths)))
    for bucket in buckets:
        longest = max(lengths[i] for i in bucket)
        assert 1 - sum(lengths[i] for i in bucket) / (longest * len(bucket)) <= 0.2
    assert len(length_buckets(lengths, max_padding=1.0)) == 1


def test_pack_rows_fills_rows_first_fit_and_places_every_text_once():
    lengths = [4, 27, 5, 26, 12, 13, 4, 25, 70]
    rows = pack_rows(lengths, capacity=32)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:
        assert sum(lengths[i] for i in row) <= 32 or row == [8]  # 70 tokens: a row of its own
    assert rows == [[8], [1, 2], [3, 0], [7, 6], [5, 4]]  # first fit by decreasing length


def test_keep_qk_hands_over_each_texts_q_and_k_and_stops_there(monkeypatch):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=VOCAB, block_size=32, n_layer=3, n_head=2, n_embd=16)
    model = build_model(config).eval()
    forwards = TextForwards(model, VOCAB, max_context=32, device=torch.device("cpu"))
    rows = [torch.randint(0, VOCAB, (n,)).tolist() for n in (5, 17, 3)]
    with torch.no_grad():
        alone = {}
        for i, ids in enumerate(rows):
            model(
                torch.tensor([ids]),
                attention_sink=lambda layer, q, k, i=i: alone.setdefault((i, layer), (q, k)),
            )
        monkeypatch.setattr(model.lm_head, "forward", None)  # no logits: a call would fail
        monkeypatch.setattr(model.transformer.h[2], "forward", None)  # nor the layer above
        kept = {}
        placements = forwards.keep_qk(
            rows, [0, 1], lambda layer, q, k: kept.setdefault(layer, (q, k))
        )
    assert sorted(i for i, _, _ in placements) == [0, 1, 2] and sorted(kept) == [0, 1]
    for i, r, s in placements:
        n = len(rows[i])
        for layer in (0, 1):
            q, k = kept[layer]
            torch.testing.assert_close(
                q[r, :, s : s + n], alone[i, layer][0][0], atol=1e-5, rtol=1e-4
            )
            torch.testing.assert_close(
                k[r, :, s : s + n], alone[i, layer][1][0], atol=1e-5, rtol=1e-4
            )
