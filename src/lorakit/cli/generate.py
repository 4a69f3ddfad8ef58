"""``lorakit generate --model M [--adapter DIR] --prompt TEXT | --prompts FILE.jsonl [--out FILE]``.

One prompt streams its answer to the terminal; a prompts file is answered in batches (left-padded,
KV-cached) and written as JSON Lines (each input record plus ``answer``), or printed.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from lorakit.errors import LoraError
from lorakit.generate.loading import load_for_generation
from lorakit.generate.prompts import read_prompts
from lorakit.generate.sampling import Sampling
from lorakit.generate.stream import generate_texts, stream_one


def add_generation_flags(p) -> None:
    """Flags ``generate`` and ``chat`` share."""
    p.add_argument("--model", required=True, help="built-in name (smollm2), HF folder or .gguf file")
    p.add_argument("--adapter", help="a LoRA adapter folder (PEFT format), merged into the model")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat-template", help="a Jinja chat template file to use")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="weights for decoding (bf16: half the memory traffic, slightly different "
                        "numbers)")
    p.add_argument("--device", default="cpu")


def register(subparsers) -> None:
    p = subparsers.add_parser("generate", help="generate text with a model and optional adapter "
                                               "(streams one prompt; batches a prompts file)")
    add_generation_flags(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="one prompt; the answer streams to the terminal")
    which.add_argument("--prompts", help='a JSONL file, one {"prompt": ...} or {"messages": [...]} '
                                         "a line")
    p.add_argument("--out", help="write answers here as JSONL (default: print them)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    p.add_argument("--no-chat", dest="chat", action="store_false",
                   help="use the prompt text as it is, without the chat template")
    p.set_defaults(run=run)


def sampling_of(args) -> Sampling:
    return Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                    top_p=args.top_p, seed=args.seed)


def run(args) -> int:
    sampling = sampling_of(args)                  # bad values fail before the model loads
    records = read_prompts(args.prompts) if args.prompts else None
    if args.batch_size < 1:
        raise LoraError(f"--batch-size {args.batch_size} must be at least 1")
    if args.out and Path(args.out).is_dir():
        raise LoraError(f"--out {args.out} is a folder; pass a file name such as answers.jsonl")
    model, tokenizer = load_for_generation(args.model, args.adapter, args.chat_template,
                                           args.precision, args.device)
    if records is None:
        stream_one(model, tokenizer, args.prompt, sampling, use_chat=args.chat, out=sys.stdout)
        print()
        return 0
    from tqdm.auto import tqdm  # deferred: heavy optional dependency
    prompts = [r.get("messages", r.get("prompt")) for r in records]
    with tqdm(total=len(prompts), desc="generate", unit="prompt", disable=not args.out) as bar:
        answers = generate_texts(model, tokenizer, prompts, sampling, args.batch_size, args.chat, bar)
    lines = [json.dumps({**r, "answer": a}) for r, a in zip(records, answers)]
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
        print(f"wrote {len(lines)} answers to {args.out}")
    else:
        print("\n".join(lines))
    return 0
