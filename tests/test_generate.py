"""Decoding: KV-cached == recomputed, batched (left-padded) == one prompt at a time, sampling rules."""

import io

import pytest
import torch

from lorakit.errors import LoraError
from lorakit.generate import Sampling, decode, prefill, top_p_filter
from lorakit.generate.stream import TextStreamer, generate_texts

pytest.importorskip("transformers")
from finetune_helpers import tiny_llama, word_tokenizer  # noqa: E402

PROMPTS = [[1, 5, 6, 7], [1, 9, 10, 11, 12, 13, 14], [1, 20]]


def _no_cache_greedy(model, prompt, n):
    """Reference: the full sequence re-run at every step, argmax of the last position."""
    seq = torch.tensor([prompt])
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(seq, use_cache=False).logits[0, -1].argmax())
            if token == 2:
                break
            out.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    return out


def test_cached_greedy_equals_recomputed_and_batched_equals_single():
    model = tiny_llama(vocab=64, seed=3)
    sampling = Sampling(max_new_tokens=12)
    batched = decode(model, PROMPTS, sampling, {2}, pad_id=2)
    for prompt, got in zip(PROMPTS, batched):
        assert got == _no_cache_greedy(model, prompt, 12)
        assert decode(model, [prompt], sampling, {2}, pad_id=2)[0] == got
    assert any(len(tokens) > 3 for tokens in batched)            # something was generated


def test_prefill_logits_of_padded_rows_match_unpadded():
    model = tiny_llama(vocab=64, seed=1)
    state = prefill(model, PROMPTS, pad_id=2)
    for row, prompt in enumerate(PROMPTS):
        with torch.no_grad():
            alone = model(torch.tensor([prompt])).logits[0, -1]
        torch.testing.assert_close(state.logits[row], alone, atol=1e-5, rtol=1e-5)
    assert state.positions.tolist() == [len(p) for p in PROMPTS]


def test_sampling_is_seeded_and_top_p_keeps_the_nucleus():
    model = tiny_llama(vocab=64, seed=2)
    hot = Sampling(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=7)
    first = decode(model, PROMPTS, hot, {2}, pad_id=2)
    assert first == decode(model, PROMPTS, hot, {2}, pad_id=2)
    other = decode(model, PROMPTS, Sampling(max_new_tokens=10, temperature=1.5, top_p=0.9, seed=8),
                   {2}, pad_id=2)
    assert first != other
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(top_p_filter(logits, 0.75))
    assert kept.tolist() == [[True, True, False, False]]            # 0.5 < 0.75 <= 0.8
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [[True, False, False, False]]
    # a tiny top_p is greedy
    greedy = decode(model, PROMPTS, Sampling(max_new_tokens=6), {2}, pad_id=2)
    assert decode(model, PROMPTS, Sampling(max_new_tokens=6, temperature=1.0, top_p=1e-6),
                  {2}, pad_id=2) == greedy


@pytest.mark.parametrize("kwargs", [{"max_new_tokens": 0}, {"temperature": -1}, {"top_p": 0},
                                    {"top_p": 1.5}])
def test_bad_sampling_settings_are_refused(kwargs):
    with pytest.raises(LoraError):
        Sampling(**kwargs)


def test_chat_template_batching_and_streaming_text():
    tok, model = word_tokenizer(), tiny_llama(vocab=64, seed=4)
    sampling = Sampling(max_new_tokens=8)
    prompts = ["what is the cat ?", [{"role": "user", "content": "hello"}], "why"]
    batched = generate_texts(model, tok, prompts, sampling, batch_size=2)
    singles = [generate_texts(model, tok, [p], sampling)[0] for p in prompts]
    assert batched == singles
    out = io.StringIO()
    from lorakit.generate.stream import stream_one
    text = stream_one(model, tok, prompts[0], sampling, out=out)
    assert out.getvalue().strip() == text.strip() == batched[0]
    plain = generate_texts(model, tok, [prompts[0]], sampling, use_chat=False)[0]
    assert isinstance(plain, str)
    assert TextStreamer(tok).shown == ""
