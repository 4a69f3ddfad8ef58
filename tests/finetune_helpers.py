"""Tiny random Llama models and a word-level chat tokenizer for the finetune/generate tests (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

WORDS = ("the a cat dog sat ran on mat log red blue is was what where who why how yes no one two "
         "three answer question please tell me about it and or not sky sea green big small hello hi "
         "good bad movie great awful fun boring").split()
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|> {% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}")


def word_tokenizer(chat: bool = True):
    """Whitespace word tokenizer: <unk> 0, <|im_start|> 1, <|im_end|> 2 (eos and pad), then WORDS and
    the role names; a ChatML-like template when ``chat``."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for word in (*WORDS, "system", "user", "assistant", "?", ".", ",", "!", ":", "#"):
        vocab.setdefault(word, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                               pad_token="<|im_end|>", unk_token="<unk>",
                                               bos_token="<|im_start|>")
    if chat:
        tok.chat_template = CHATML
    return tok


def tiny_llama(vocab: int = 64, seed: int = 0, layers: int = 2):
    import transformers
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=layers, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=256,
                                      eos_token_id=2, pad_token_id=2, bos_token_id=1)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_llama_dir(path: Path, chat: bool = True) -> Path:
    """A saved tiny Llama + tokenizer: a local Hugging Face model directory for the CLI."""
    tiny_llama().save_pretrained(path)
    word_tokenizer(chat).save_pretrained(path)
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def qa_records(n: int = 24) -> list[dict]:
    """prompt/completion pairs the tiny model can learn: a fixed answer per question word."""
    subjects = ["cat", "dog", "sky", "sea", "mat", "log"]
    answers = {"what": "it is red", "where": "on the mat", "who": "the big dog", "how": "yes and no"}
    out = []
    for i in range(n):
        q = list(answers)[i % 4]
        out.append({"prompt": f"{q} is the {subjects[i % 6]} ?", "completion": answers[q] + " ."})
    return out


def run_cli(argv: list[str], capsys=None) -> int:
    """``lorakit <argv>`` through lorakit.cli.main (the finetune/generate/chat verbs are wired there)."""
    from lorakit.cli import main
    return main([str(a) for a in argv])


def tiny_bert_dir(path: Path) -> Path:
    """A saved tiny random BERT sequence classifier (no head weights needed) + the word tokenizer."""
    import transformers
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64, architectures=["BertModel"])
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(path)
    word_tokenizer(chat=False).save_pretrained(path)
    return path
