"""The gw task's Whisper encoder runs plain (eager) attention, which computes what sdpa computes."""

import torch

from lorakit.tasks.gw import WhisperDetector


def test_eager_attention_matches_sdpa():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    torch.manual_seed(0)
    config = WhisperConfig(d_model=32, num_mel_bins=8, encoder_layers=2, encoder_attention_heads=4,
                           encoder_ffn_dim=64, max_source_positions=8)
    model = WhisperDetector(WhisperEncoder(config), 32).eval()
    assert model.encoder.config._attn_implementation == "eager"
    features = torch.randn(2, 3, 8, 16)
    with torch.no_grad():
        eager = model(features)
        model.encoder.config._attn_implementation = "sdpa"
        sdpa = model(features)
    torch.testing.assert_close(eager, sdpa, rtol=1e-5, atol=1e-5)
