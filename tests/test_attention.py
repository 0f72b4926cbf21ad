"""mpo_fast.attention: attention stays inside each packed sequence.

`varlen_attention` is checked against an explicit per-sequence float64 reference; a tiny
randomly initialised Hugging Face causal LM (no download) must give the same per-token
log-probs for a packed batch as for its sequences run one by one with "sdpa".
"""

import copy
import math

import pytest
import torch
from conftest import requires_cuda

from mpo_fast import attention, packing

transformers = pytest.importorskip("transformers")


def random_cu(S: int, max_len: int) -> torch.Tensor:
    lengths = torch.randint(0, max_len + 1, (S,))
    lengths[torch.randperm(S)[: min(S, 3)]] = torch.tensor([0, 1, max_len])[: min(S, 3)]
    return torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).to(torch.int32)


def reference_attention(q, k, v, cu, scale, causal, window, softcap):
    """One sequence at a time, explicit scores and mask, float64."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    rep = q.shape[1] // k.shape[1]
    c = cu.tolist()
    for s in range(len(c) - 1):
        a, b = c[s], c[s + 1]
        if a == b:
            continue
        qs = q[a:b].double().transpose(0, 1)
        ks = k[a:b].double().repeat_interleave(rep, 1).transpose(0, 1)
        vs = v[a:b].double().repeat_interleave(rep, 1).transpose(0, 1)
        scores = qs @ ks.transpose(-1, -2) * scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        i = torch.arange(b - a)
        allowed = torch.ones(b - a, b - a, dtype=torch.bool)
        if causal:
            allowed &= i[None, :] <= i[:, None]
        if window is not None:
            allowed &= (i[:, None] - i[None, :]).abs() < window
        probs = scores.masked_fill(~allowed, -math.inf).softmax(-1)
        out[a:b] = (probs @ vs).transpose(0, 1)
    return out


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("softcap", [None, 4.0])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("path", ["per-sequence", "one-masked-call"])
def test_varlen_sdpa_matches_per_sequence_reference(causal, window, softcap, heads, path):
    """"sdpa" on a CPU runs one call per sequence; on a GPU one call with a block-diagonal
    mask: both paths, checked here on the CPU, rows past cu_seqlens[-1] included."""
    hq, hkv = heads
    cu = random_cu(7, 9)
    N = int(cu[-1]) + 2  # two trailing rows: one more sequence
    q = torch.randn(N, hq, 8, dtype=torch.float64)
    k = torch.randn(N, hkv, 8, dtype=torch.float64)
    v = torch.randn(N, hkv, 5, dtype=torch.float64)  # the value head dim may differ
    if path == "per-sequence":
        out = attention.varlen_attention(q, k, v, cu, scale=0.3, causal=causal,
                                         sliding_window=window, softcap=softcap, backend="sdpa")
    else:
        seq_ids = attention._seq_ids_from_cu(cu, N)
        out = attention._masked_attention(q, k, v, seq_ids, 0.3, causal, window, softcap, 0.0)
    ref = reference_attention(q, k, v, torch.cat([cu, cu.new_tensor([N])]), 0.3, causal, window,
                              softcap)
    assert out.shape == (N, hq, 5)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)


def test_zero_attention_across_boundaries():
    cu = random_cu(5, 8)
    N = int(cu[-1])
    q, k, v = (torch.randn(N, 2, 4, requires_grad=True) for _ in range(3))
    out = attention.varlen_attention(q, k, v, cu, causal=False)
    seq = torch.searchsorted(cu[1:].long(), torch.arange(N), right=True)
    for s in range(5):
        rows = seq == s
        if not rows.any():
            continue
        gq, gk, gv = torch.autograd.grad(out[rows].sum(), (q, k, v), retain_graph=True)
        for g in (gq, gk, gv):
            assert bool((g[~rows] == 0).all()), "gradient leaked across a sequence boundary"


# ----------------------------------------------------------------------------- HF models


def tiny_config(family: str):
    common = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    if family == "mistral":
        return transformers.MistralConfig(sliding_window=6, **common)
    return transformers.LlamaConfig(**common)


def tiny_models(family: str):
    name = attention.register()
    cfg = tiny_config(family)
    packed_model = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation=name).eval()
    reference = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(cfg), attn_implementation="sdpa").eval()
    reference.load_state_dict(packed_model.state_dict())
    assert packed_model.config._attn_implementation == name
    return packed_model, reference


def token_logprobs(logits, targets, ignore=-100):
    keep = targets != ignore
    logp = logits.float().log_softmax(-1)
    return logp[keep].gather(-1, targets[keep, None]).squeeze(-1)


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_hf_packed_logprobs_match_one_by_one(family):
    model, reference = tiny_models(family)
    S, T = 6, 20
    ids = torch.randint(0, 97, (S, T))
    lengths = torch.randint(1, T + 1, (S,))
    lengths[:3] = torch.tensor([1, T, 2])[torch.randperm(3)]
    p = packing.pack(ids, lengths)
    completion = torch.rand(p.num_tokens) > 0.3
    targets = packing.shift_targets(p.tokens, p.cu_seqlens, completion)
    with torch.no_grad():
        logits = model(**attention.model_inputs(p)).logits[0]
        got = token_logprobs(logits, targets)
        want = []
        for s in range(S):
            a, b = p.cu_seqlens[s].item(), p.cu_seqlens[s + 1].item()
            one = reference(input_ids=ids[s : s + 1, : b - a]).logits[0]
            want.append(token_logprobs(one, targets[a:b]))
        torch.testing.assert_close(got, torch.cat(want), rtol=0, atol=2e-5)
        # without cu_seq_lens the layers fall back to the position_ids boundaries
        again = model(input_ids=p.tokens[None], position_ids=p.position_ids[None]).logits[0]
        assert torch.equal(again, logits)


def test_hf_sequences_do_not_see_each_other():
    model, _ = tiny_models("llama")
    S, T = 4, 12
    ids = torch.randint(0, 97, (S, T))
    lengths = torch.tensor([12, 5, 9, 7])
    p = packing.pack(ids, lengths)
    changed = ids.clone()
    changed[1] = (changed[1] + 1) % 97  # change every token of sequence 1
    q = packing.pack(changed, lengths)
    with torch.no_grad():
        a = model(**attention.model_inputs(p)).logits[0]
        b = model(**attention.model_inputs(q)).logits[0]
    rows1 = slice(int(p.cu_seqlens[1]), int(p.cu_seqlens[2]))
    other = torch.ones(p.num_tokens, dtype=torch.bool)
    other[rows1] = False
    assert torch.equal(a[other], b[other])
    assert not torch.equal(a[rows1], b[rows1])


def test_hf_gradients_flow_through_packed_attention():
    model, reference = tiny_models("llama")
    model.train()
    reference.train()
    ids = torch.randint(0, 97, (3, 10))
    lengths = torch.tensor([10, 4, 7])
    p = packing.pack(ids, lengths)
    targets = packing.shift_targets(p.tokens, p.cu_seqlens, torch.ones(p.num_tokens, dtype=bool))
    token_logprobs(model(**attention.model_inputs(p)).logits[0], targets).sum().backward()
    total = 0
    for s in range(3):
        a, b = int(p.cu_seqlens[s]), int(p.cu_seqlens[s + 1])
        one = reference(input_ids=ids[s : s + 1, : b - a]).logits[0]
        total = total + token_logprobs(one, targets[a:b]).sum()
    total.backward()
    for (name, w), w_ref in zip(model.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_layer_rejects_masks_and_kv_cache():
    module = torch.nn.Module()
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="takes no attention_mask"):
        attention.packed_attention_forward(module, q, q, q, torch.ones(1, 1, 5, 5))
    with pytest.raises(ValueError, match="KV cache"):
        attention.packed_attention_forward(module, q[:, :, :1], q, q, None)
    with pytest.raises(ValueError, match="backend must be one of"):
        attention.varlen_attention(q[0].transpose(0, 1), q[0].transpose(0, 1),
                                   q[0].transpose(0, 1), torch.tensor([0, 5], dtype=torch.int32),
                                   backend="flash")
    with pytest.raises(TypeError, match="cu_seqlens must be int32"):
        x = torch.randn(5, 2, 4)
        attention.varlen_attention(x, x, x, torch.tensor([0.0, 5.0]))


def test_unpadded_rows_without_kwargs_are_independent_sequences():
    """No cu_seq_lens and no position_ids: each batch row is one causal sequence."""
    module = torch.nn.Module()
    q, k, v = (torch.randn(3, 2, 6, 4) for _ in range(3))
    out, _ = attention.packed_attention_forward(module, q, k, v, None)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, ref.transpose(1, 2))


@requires_cuda
@pytest.mark.parametrize("backend", ["flash_attn", "varlen"])
def test_cuda_varlen_kernels_match_masked_sdpa(backend):
    if backend == "flash_attn" and attention._flash_attn_fn() is None:
        pytest.skip("flash-attn is not installed")
    if backend == "varlen" and attention._varlen_fn()[0] is None:
        pytest.skip("this torch has no torch.nn.attention.varlen")
    cu = random_cu(9, 300).cuda()
    N = int(cu[-1])
    q = torch.randn(N, 8, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(N, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    out = attention.varlen_attention(q, k, v, cu, 300, backend=backend)
    ref = attention.varlen_attention(q.float(), k.float(), v.float(), cu, backend="sdpa")
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


def test_packed_model_output_goes_straight_into_the_loss():
    """pack -> packed attention -> MPOLoss on the model's [1, N, H], with the packer's
    Segments, equals MPOLoss on the padded batch run through the "sdpa" model."""
    from mpo_fast import MPOLoss

    model, reference = tiny_models("llama")
    B, T = 2, 12
    ids = torch.randint(0, 97, (2 * B, T))
    lengths = torch.randint(4, T + 1, (2 * B,))
    position = torch.arange(T)[None, :]
    real = position < lengths[:, None]
    completion = real & (position >= 2)  # the first two tokens of every sequence: the prompt
    p = packing.pack(ids, lengths)
    targets = p.shift_targets(completion)
    ref = (-torch.rand(B) * 30, -torch.rand(B) * 30)
    with torch.no_grad():
        hidden = model.model(**attention.model_inputs(p)).last_hidden_state
        assert hidden.shape == (1, p.num_tokens, 64)
        padded = reference.model(input_ids=ids, attention_mask=real).last_hidden_state
    weight = model.lm_head.weight.detach()
    out = MPOLoss()(hidden, weight, targets, cu_seqlens=p.segments, ref_logps=ref)
    padded_targets = p.unpack(targets, backend="torch")
    padded_targets[~real] = -100
    want = MPOLoss()(padded, weight, padded_targets, ref_logps=ref)
    torch.testing.assert_close(out.chosen_logps, want.chosen_logps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out.loss, want.loss, rtol=1e-5, atol=1e-5)
