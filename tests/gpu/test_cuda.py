"""GPU correctness (marker `gpu`, skipped without CUDA): bf16 training steps, the flash SDPA
path, KV-cache decoding and attention capture on the device.

    .venv/bin/pytest -m gpu tests/gpu
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnlm.config import GPTConfig
from attnlm.generate import SamplingParams, generate
from attnlm.model import GPT

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]
CFG = GPTConfig(vocab_size=4096, block_size=256, n_layer=6, n_head=6, n_embd=384)


@pytest.fixture
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(CFG).to("cuda").eval()


def test_forward_runs_on_the_flash_kernel_in_bf16(model):
    idx = torch.randint(0, CFG.vocab_size, (4, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        flash = model(idx).logits  # raises if the call is not flash-eligible
    with torch.autocast("cuda", dtype=torch.bfloat16), sdpa_kernel(SDPBackend.MATH):
        math_path = model(idx).logits
    assert (flash.float() - math_path.float()).abs().max().item() < 0.1


def test_explicit_path_equals_sdpa_on_gpu_fp32(model):
    idx = torch.randint(0, CFG.vocab_size, (2, 128), device="cuda")
    with sdpa_kernel(SDPBackend.MATH):  # fp32 reference: no TF32 flash kernel
        fast = model(idx).logits
    explicit = model(idx, return_attention=True)
    assert (fast - explicit.logits).abs().max().item() < 1e-4
    att = explicit.attention
    torch.testing.assert_close(att.sum(-1), torch.ones_like(att.sum(-1)), atol=1e-5, rtol=0)


def test_kv_cache_decoding_matches_full_forward_in_bf16(model):
    model = model.to(torch.bfloat16)
    prompt = torch.randint(0, CFG.vocab_size, (2, 32), device="cuda")
    result = generate(
        model, prompt, SamplingParams(max_new_tokens=32, temperature=0), return_attention=True
    )
    seq = torch.cat([prompt, torch.tensor(result.tokens, device="cuda")], 1)
    full = model(seq, return_attention=True)
    greedy_full = full.logits[:, 31:-1].float().argmax(-1)
    agree = (greedy_full == seq[:, 32:]).float().mean().item()
    assert agree > 0.9  # bf16 rounding may flip a near-tie
    assert result.attention.shape == full.attention.shape
    assert (result.attention - full.attention).abs().max().item() < 0.05


def test_bf16_mixed_training_steps_reduce_loss():
    torch.manual_seed(0)
    model = GPT(CFG).to("cuda")
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-3, fused=True)
    x = torch.randint(0, CFG.vocab_size, (8, 256), device="cuda")
    losses = []
    for _ in range(30):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, x.roll(-1, 1)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0] - 2.0


def test_cuda_graph_decode_equals_eager_decode(model):
    """The fast path on CUDA: one CUDA graph per width bucket, the same tokens as eager."""
    from attnlm.batching import DecodeBatch

    graphs = DecodeBatch(model, slots=8, compile=True)
    assert graphs.decoder.mode == "cuda-graphs", graphs.decoder.fallback
    eager = DecodeBatch(model, slots=8)
    prompts = [torch.randint(0, CFG.vocab_size, (n, t), device="cuda") for n, t in ((1, 5), (3, 9))]
    params = [
        SamplingParams(max_new_tokens=40, temperature=0),
        SamplingParams(max_new_tokens=30, temperature=0.9, top_k=50, seed=3),
    ]
    got = {}
    for name, batch in (("graphs", graphs), ("eager", eager)):
        requests = [batch.add(p, s) for p, s in zip(prompts, params, strict=True)]
        steps = {r: [] for r in requests}
        while batch.requests:
            for request, step in batch.step():
                steps[request].append(step)
        got[name] = [steps[r] for r in requests]
    for g_steps, e_steps in zip(got["graphs"], got["eager"], strict=True):
        assert len(g_steps) == len(e_steps)
        for g, e in zip(g_steps, e_steps, strict=True):
            assert torch.equal(g.tokens, e.tokens)
            assert (g.logits - e.logits).abs().max().item() < 1e-4
