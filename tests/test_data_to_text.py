"""data-to-text: the synthetic E2E-style data, prompt masking in the loss, BLEU, and one real run."""

import pytest
import torch

from lorakit.tasks.e2e_synth import NAMES, build_mrs, split

transformers = pytest.importorskip("transformers")


def test_dataset_is_seeded_distinct_and_split_by_mr():
    examples = build_mrs(300, seed=1)
    assert examples == build_mrs(300, seed=1) and examples != build_mrs(300, seed=2)
    assert len({ex.mr for ex in examples}) == 300
    train, val = split(examples, 50)
    assert len(val) == 50 and not {ex.mr for ex in train} & {ex.mr for ex in val}
    for ex in examples:
        slots = dict(ex.slots)
        assert slots["name"] in NAMES and 3 <= len(slots) <= 8
        assert len(set(ex.references)) == len(ex.references) >= 4         # distinct realisations
        for ref in ex.references:                                          # values said verbatim
            for slot in ("name", "area", "near"):
                assert slot not in slots or slots[slot] in ref, (slot, ref)
            if "food" in slots:
                assert slots["food"].lower() in ref.lower(), ref


def _word_tokenizer(examples):
    """A word-level tokenizer with a ChatML-like template: real padding and chat behaviour, no download."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = {w for ex in examples for text in (ex.mr, *ex.references) for w in
             pre_tokenizers.Whitespace().pre_tokenize_str(text)}
    words |= set(pre_tokenizers.Whitespace().pre_tokenize_str("system user assistant Describe the "
                 "restaurant in fluent English. Mention every field, nothing else."))
    vocab = {"<unk>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    vocab.update({w[0]: i for i, w in enumerate(sorted(words), start=3)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>",
                                               pad_token="<|im_end|>", unk_token="<unk>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}"
                         "<|im_end|> {% endfor %}{% if add_generation_prompt %}<|im_start|>assistant "
                         "{% endif %}")
    return tok


def test_labels_cover_exactly_the_target_and_prompts_are_left_padded():
    from lorakit.tasks.data_to_text import encode_pairs
    examples = build_mrs(6, seed=0)
    tok = _word_tokenizer(examples)
    data = encode_pairs(tok, [(ex, ex.references[1]) for ex in examples], with_prompts=True)
    for row, ex in enumerate(examples):
        target = data.tensors["labels"][row][data.tensors["labels"][row] != -100]
        assert tok.decode(target) == tok.decode(tok(ex.references[1] + "<|im_end|>")["input_ids"])
        n = int(data.tensors["attention_mask"][row].sum())
        prompt = data.tensors["input_ids"][row, :n - len(target)]           # right-padded rows
        assert tok.decode(prompt).rstrip().endswith("assistant")
        left = data.tensors["prompt_ids"][row][data.tensors["prompt_mask"][row].bool()]
        assert torch.equal(left, prompt)                                     # same prompt, left-padded
        assert data.tensors["prompt_mask"][row, -1] == 1


def _tiny_llama():
    config = transformers.LlamaConfig(vocab_size=50, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def test_loss_is_next_token_cross_entropy_on_target_tokens_only():
    from lorakit.tasks.data_to_text import DataToTextTask
    task, model = DataToTextTask(), _tiny_llama()
    ids = torch.randint(3, 50, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0                                              # row 1 is right-padded
    labels = torch.full_like(ids, -100)
    labels[0, 5:12], labels[1, 6:9] = ids[0, 5:12], ids[1, 6:9]  # prompts: 5 and 6 tokens
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    logits = task.forward(model, batch).detach().requires_grad_(True)
    loss = task.loss(logits, batch)
    picked = torch.cat([logits[0, 4:11].log_softmax(-1).gather(1, ids[0, 5:12, None]),
                        logits[1, 5:8].log_softmax(-1).gather(1, ids[1, 6:9, None])])
    torch.testing.assert_close(loss, -picked.mean())
    loss.backward()
    predicts_target = torch.zeros(2, 12, dtype=torch.bool)
    predicts_target[0, 4:11], predicts_target[1, 5:8] = True, True
    assert logits.grad[~predicts_target].abs().max() == 0        # prompt and padding add nothing
    assert (logits.grad[predicts_target].abs().sum(-1) > 0).all()


def test_bleu_comes_from_sacrebleu_with_uneven_reference_counts():
    pytest.importorskip("sacrebleu")
    from lorakit.tasks.generation import corpus_bleu
    refs = [("the pub is cheap .", "it is a cheap pub ."), ("the cafe is near the river .",)]
    assert corpus_bleu(["it is a cheap pub .", "the cafe is near the river ."], refs) == pytest.approx(100)
    assert corpus_bleu(["a pub", "the river"], refs) < 20.0


def test_greedy_decode_matches_a_manual_argmax_loop():
    from lorakit.tasks.generation import greedy_decode

    class Ids:                           # decode = the token ids as text, to compare exactly
        eos_token_id, pad_token_id = 1, 0

        def batch_decode(self, rows, skip_special_tokens):
            return [" ".join(str(t) for t in row.tolist() if t not in (0, 1)) for row in rows]

    model = _tiny_llama()
    prompts = torch.tensor([[0, 0, 5, 6, 7], [8, 9, 10, 11, 12]])
    mask = (prompts != 0).long()
    got = greedy_decode(model, Ids(), prompts, mask, torch.device("cpu"), 4, 2)
    for row in range(2):
        seq = prompts[row][mask[row].bool()][None]
        for _ in range(4):
            with torch.no_grad():
                seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
        expected = [t for t in seq[0, int(mask[row].sum()):].tolist()]
        cut = expected.index(1) if 1 in expected else len(expected)
        assert got[row] == " ".join(str(t) for t in expected[:cut] if t != 0)


@pytest.mark.slow
def test_real_smollm2_lora_trains_evaluates_and_reloads(tmp_path):
    """SmolLM2-135M, LoRA on q, v: 3 steps, BLEU on 8 validation MRs, adapter reload check."""
    pytest.importorskip("gguf")
    pytest.importorskip("sacrebleu")
    from lorakit.io import save_adapter
    from lorakit.tasks import get_task
    from lorakit.tasks.base import ModelOptions
    from lorakit.train.loop import train
    from lorakit.experiments.run import verify_saved_adapter
    task = get_task("data-to-text")
    train_data, val = task.load_data(quick=True, seed=0)
    val = val.subset(8)
    model = task.build_model("lora", ModelOptions())
    settings = task.settings("lora", quick=True).replace(max_steps=3, eval_every=3)
    result = train(model, task, train_data, val, settings, tmp_path, progress=False)
    record = result["history"][-1]
    assert result["trainable_params"] == 30 * 8 * ((576 + 576) + (576 + 192))    # q, v at r=8
    assert 0 <= record["val_bleu_base"] <= 100 and 0 <= record["val_bleu"] <= 100
    assert record["val_loss"] < 2.5
    save_adapter(model, tmp_path / "adapter")
    check = verify_saved_adapter(model, task, ModelOptions(), val, tmp_path / "adapter")
    assert check["reloaded_max_abs_diff"] < 1e-3
