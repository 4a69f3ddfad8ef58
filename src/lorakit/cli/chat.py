"""``lorakit chat --model M [--adapter DIR]``: a terminal conversation, streamed, on top of generate.

Each turn renders the whole conversation with the tokenizer's chat template and decodes the answer
with the KV cache. ``/reset`` starts over, ``/exit`` (or end of input) quits.
"""

from __future__ import annotations

import sys

from lorakit.cli.generate import add_generation_flags, sampling_of
from lorakit.errors import LoraError
from lorakit.generate.loading import load_for_generation
from lorakit.generate.prompts import has_chat_template
from lorakit.generate.stream import stream_one


def register(subparsers) -> None:
    p = subparsers.add_parser("chat", help="talk to a model (and adapter) in the terminal")
    add_generation_flags(p)
    p.add_argument("--system", help="a system message opening the conversation")
    p.set_defaults(run=run)


def run(args, stdin=None, stdout=None) -> int:
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    sampling = sampling_of(args)
    model, tokenizer = load_for_generation(args.model, args.adapter, args.chat_template,
                                           args.precision, args.device)
    if not has_chat_template(tokenizer):
        raise LoraError("chat needs a tokenizer with a chat template; pass --chat-template FILE, or "
                        "use `lorakit generate --prompt` for plain continuation")
    opening = [{"role": "system", "content": args.system}] if args.system else []
    messages = list(opening)
    stdout.write("lorakit chat: /reset starts over, /exit quits\n")
    while True:
        stdout.write("you> ")
        stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            stdout.write("\n")
            return 0
        if line.strip() == "/reset":
            messages = list(opening)
            continue
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.strip()})
        stdout.write("model> ")
        answer = stream_one(model, tokenizer, messages, sampling, out=stdout)
        stdout.write("\n")
        messages.append({"role": "assistant", "content": answer.strip()})
