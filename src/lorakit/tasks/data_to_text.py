"""The paper's E2E NLG experiment in miniature: LoRA on SmolLM2-135M-Instruct, MR -> restaurant text.

    prompt  = chat(system: INSTRUCTION, user: "name[The Eagle], eatType[pub], ...")
    target  = one reference sentence + <|im_end|>
    tokens (B, T<=MAX_LENGTH) -> LlamaForCausalLM -> logits (B, T, 49152)
    loss    = next-token cross-entropy on the target tokens only (prompt and padding masked, -100)
    val     = val_loss (teacher-forced, first reference) and val_bleu: greedy decoding of each
              held-out MR, sacreBLEU corpus BLEU against all of its references

The data are synthetic (tasks/e2e_synth.py): E2E's slots and MR format, but template-generated
references, 5 per MR, split by distinct MR. BLEU here measures learning that template language, not
open-ended generation; it is not comparable with the paper's E2E scores (GPT-2 M + LoRA: 70.4).

Methods: ``lora`` (r=8 on q_proj, v_proj; the paper's E2E runs adapt W_q, W_v at r=4), ``lora-all``
(r=8 on every linear layer of the 30 blocks: q, k, v, o, gate, up, down), ``full`` (all 134.5M
parameters; slow on a CPU) and the other registered methods with the q, v spec. ``lora-all`` is a
method name of this task only, so that ``compare`` can run both target sets side by side. There is no
new head: the LM head is the pretrained one (tied to the embeddings).

"Before": the first evaluation of a run also decodes with the untouched base, with the same prompt
(``val_bleu_base``) and with one worked example from the training set prepended (``val_bleu_base_1shot``,
the base's best chance), so every run records its own before/after on the same MRs.
"""

from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F
from torch import nn

from lorakit.errors import LoraError
from lorakit.methods import AdaptSpec, apply_method
from lorakit.models import load
from lorakit.tasks.base import ModelOptions
from lorakit.tasks.e2e_synth import Example, build_mrs, split
from lorakit.tasks.generation import corpus_bleu, greedy_decode, inference_copy, teacher_forced_loss
from lorakit.train.data import TensorData
from lorakit.train.settings import TrainSettings

INSTRUCTION = "Describe the restaurant in fluent English. Mention every field, nothing else."
N_MRS, N_VAL = 3000, 200          # distinct MRs drawn (seed 0); the last N_VAL are validation
QUICK_VAL = 64                    # validation MRs in --quick
MAX_LENGTH = 160                  # prompt + target tokens; the longest training pair has 150
MAX_NEW_TOKENS = 72               # the longest reference is 65 tokens with <|im_end|>
GEN_BATCH = 64
QV, ALL_LINEAR = ["q_proj", "v_proj"], "all-linear"


@functools.lru_cache(maxsize=1)
def _base():
    """The pretrained model and tokenizer, loaded once per process (about 20 s from GGUF)."""
    return load("smollm2", task="causal-lm")


@functools.lru_cache(maxsize=1)
def examples() -> tuple[list[Example], list[Example]]:
    return split(build_mrs(N_MRS, seed=0), N_VAL)


class DataToTextTask:
    name = "data-to-text"
    metric = "val_bleu"
    methods = ("lora", "lora-all")

    def __init__(self):
        self._base_scored = False

    def settings(self, method: str, quick: bool) -> TrainSettings:
        lr = 1e-4 if method == "full" else 1e-3
        if quick:
            return TrainSettings(lr=lr, batch_size=8, max_steps=30, eval_every=30, warmup_frac=0.1,
                                 precision="bf16")
        return TrainSettings(lr=lr, batch_size=8, max_steps=150, eval_every=75, warmup_frac=0.06,
                             precision="bf16")

    def load_data(self, quick: bool, seed: int, data_dir: str | None = None):
        if data_dir:
            raise LoraError("data-to-text builds its data in code (tasks/e2e_synth.py); drop --data-dir")
        train, val = examples()
        val = val[:QUICK_VAL] if quick else val
        tokenizer = _base().tokenizer
        pairs = [(ex, ref) for ex in train for ref in ex.references]
        return (encode_pairs(tokenizer, pairs),
                encode_pairs(tokenizer, [(ex, ex.references[0]) for ex in val], with_prompts=True))

    def build_model(self, method: str, options: ModelOptions) -> nn.Module:
        if method == "lora-all" and options.targets:
            raise LoraError(f"lora-all adapts every linear layer; for targets {options.targets} use "
                            "--method lora --targets ...")
        model = copy.deepcopy(_base().model)
        targets = ALL_LINEAR if method == "lora-all" else (options.targets or QV)
        spec = AdaptSpec(head=[], lora_targets=targets, r=options.r or 8, alpha=options.alpha or 16)
        return apply_method(model, "lora" if method == "lora-all" else method, spec)

    def forward(self, model: nn.Module, batch: dict) -> torch.Tensor:
        """Logits (B, W, vocab) for the batch cut to its longest row W (rows are right-padded)."""
        width = int(batch["attention_mask"].sum(1).max())
        return model(input_ids=batch["input_ids"][:, :width],
                     attention_mask=batch["attention_mask"][:, :width]).logits

    def loss(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """Mean next-token cross-entropy over target tokens: position t predicts token t + 1."""
        labels = batch["labels"][:, :logits.shape[1]]
        return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                               ignore_index=-100)

    def evaluate(self, model: nn.Module, data: TensorData, device, settings: TrainSettings) -> dict:
        """val_loss and val_bleu of ``model``; at a run's first evaluation, the untouched base's BLEU
        too. Both run on an inference copy (LoRA merged, bf16 weights under bf16)."""
        val = [examples()[1][i] for i in data.tensors["mr_index"].tolist()]
        refs = [ex.references for ex in val]
        tokenizer = _base().tokenizer
        prompts = (data.tensors["prompt_ids"], data.tensors["prompt_mask"])

        def bleu(candidate, prompt_ids, prompt_mask) -> float:
            return corpus_bleu(greedy_decode(candidate, tokenizer, prompt_ids, prompt_mask, device,
                                             MAX_NEW_TOKENS, GEN_BATCH), refs)

        fast = inference_copy(model, settings.precision)
        metrics = {"val_loss": teacher_forced_loss(self, fast, data, device),
                   "val_bleu": bleu(fast, *prompts)}
        if not self._base_scored:            # once per run: the untouched base on the same MRs
            self._base_scored = True
            base = inference_copy(_base().model, settings.precision).to(device)
            metrics["val_bleu_base"] = bleu(base, *prompts)
            one_shot = encode_prompts(tokenizer, val, shot=examples()[0][0])
            metrics["val_bleu_base_1shot"] = bleu(base, *one_shot)
        return metrics

    def report_notes(self, results: dict) -> list[str]:
        lines = ["Task: E2E-style data-to-text with SmolLM2-135M-Instruct. The data are synthetic: "
                 "E2E's slots and MR format, references generated by templates (5 per MR), split by "
                 "distinct MR; BLEU measures learning that template language and is not comparable "
                 "with the paper's E2E numbers (GPT-2 M + LoRA r=4 on q, v: BLEU 70.4)."]
        for method, run in results["methods"].items():
            first = (run.get("history") or [{}])[0]
            if "val_bleu_base" in first:
                lines.append(f"Before training ({method} run, same validation MRs): the untouched base "
                             f"scores BLEU {first['val_bleu_base']:.2f} with the training prompt and "
                             f"{first['val_bleu_base_1shot']:.2f} with one worked example.")
                break
        return lines


def _chat(tokenizer, mr: str, shot: Example | None = None) -> str:
    messages = [{"role": "system", "content": INSTRUCTION}]
    if shot is not None:
        messages += [{"role": "user", "content": shot.mr},
                     {"role": "assistant", "content": shot.references[0]}]
    messages += [{"role": "user", "content": mr}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_pairs(tokenizer, pairs: list[tuple[Example, str]], with_prompts: bool = False) -> TensorData:
    """Right-padded prompt + target rows; ``labels`` is -100 except on the target tokens.

    With ``with_prompts`` (validation) the rows also carry the left-padded prompt alone, for
    generation, and ``mr_index``, the row's position in the validation split."""
    end = tokenizer.eos_token                      # <|im_end|>, where the assistant's turn stops
    mrs = sorted({ex.mr for ex, _ in pairs})
    prompts = dict(zip(mrs, tokenizer([_chat(tokenizer, mr) for mr in mrs],
                                      add_special_tokens=False)["input_ids"]))
    targets = tokenizer([ref + end for _, ref in pairs], add_special_tokens=False)["input_ids"]
    ids = torch.full((len(pairs), MAX_LENGTH), tokenizer.pad_token_id)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, ((ex, _), target) in enumerate(zip(pairs, targets)):
        prompt = prompts[ex.mr]
        if len(prompt) + len(target) > MAX_LENGTH:
            raise LoraError(f"{len(prompt) + len(target)} tokens exceed MAX_LENGTH={MAX_LENGTH}: {ex.mr}")
        n = len(prompt) + len(target)
        ids[row, :n] = torch.tensor(prompt + target)
        mask[row, :n] = 1
        labels[row, len(prompt):n] = torch.tensor(target)
    tensors = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if with_prompts:
        tensors["prompt_ids"], tensors["prompt_mask"] = encode_prompts(tokenizer, [ex for ex, _ in pairs])
        tensors["mr_index"] = torch.arange(len(pairs))
    return TensorData(tensors)


def encode_prompts(tokenizer, exs: list[Example], shot: Example | None = None):
    """Left-padded prompts (ids, mask), so that every row's next token is at the last column."""
    texts = [_chat(tokenizer, ex.mr, shot) for ex in exs]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    finally:
        tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]
