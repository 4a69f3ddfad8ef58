"""Text generation: KV-cached decoding (decode.py), sampling (sampling.py), prompts and chat
templates (prompts.py), streaming and batched generation (stream.py)."""

from lorakit.generate.decode import DecodeState, decode, prefill, step, stop_ids
from lorakit.generate.prompts import encode_prompt, has_chat_template, prompt_text, read_prompts
from lorakit.generate.sampling import Sampling, next_tokens, top_p_filter
from lorakit.generate.stream import TextStreamer, generate_texts, stream_one

__all__ = ["DecodeState", "decode", "prefill", "step", "stop_ids", "encode_prompt",
           "has_chat_template", "prompt_text", "read_prompts", "Sampling", "next_tokens",
           "top_p_filter", "TextStreamer", "generate_texts", "stream_one"]
