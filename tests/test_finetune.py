"""finetune: record formats, completion-only masks, truncation, packing == unpacked loss, length
grouping, config round trip; one tiny end-to-end run through the CLI with --resume."""

import json

import pytest
import torch

from lorakit.errors import LoraError
from lorakit.finetune.batches import TokenData
from lorakit.finetune.config import FinetuneConfig, config_differences, read_config_file, resolve
from lorakit.finetune.encode import IGNORE, encode_classify, encode_sft
from lorakit.finetune.formats import detect_format, infer_task, segments

pytest.importorskip("transformers")
from finetune_helpers import (qa_records, run_cli, tiny_llama, tiny_llama_dir,  # noqa: E402
                              word_tokenizer, write_jsonl)


def _trained_text(tok, ids, labels):
    return tok.decode([i for i, lab in zip(ids, labels) if lab != IGNORE])


def test_chat_prompt_completion_trains_the_answer_and_end_of_turn_only():
    tok = word_tokenizer()
    records = [{"prompt": "what is the cat ?", "completion": "it is red ."}]
    enc = encode_sft(records, "prompt-completion", tok, True, 64, False, "d")
    ids, labels = enc.ids[0], enc.labels[0]
    assert tok.decode(ids).startswith("<|im_start|> user what is the cat ?")
    assert _trained_text(tok, ids, labels) == "it is red . <|im_end|>"
    assert labels[0] == IGNORE
    everything = encode_sft(records, "prompt-completion", tok, True, 64, True, "d")
    assert everything.ids == enc.ids and everything.labels[0][1:] == ids[1:]   # --train-on-prompt


def test_messages_train_every_assistant_turn_and_nothing_else():
    tok = word_tokenizer()
    conv = {"messages": [{"role": "system", "content": "tell me"},
                         {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "why ?"}, {"role": "assistant", "content": "no"}]}
    segs = segments(conv, "messages", tok, True, "r")
    assert [t for _, t in segs] == [False, True, False, True]
    assert "".join(text for text, _ in segs) == tok.apply_chat_template(conv["messages"], tokenize=False)
    enc = encode_sft([conv], "messages", tok, True, 64, False, "d")
    assert _trained_text(tok, enc.ids[0], enc.labels[0]) == "hello <|im_end|> no <|im_end|>"


def test_alpaca_and_text_and_plain_formats():
    tok = word_tokenizer()
    alpaca = {"instruction": "tell me about it", "input": "the dog", "output": "it ran ."}
    plain = segments(alpaca, "alpaca", tok, False, "r")
    assert "### Instruction:\ntell me about it" in plain[0][0] and "### Input:\nthe dog" in plain[0][0]
    assert plain[1] == ("it ran .<|im_end|>", True)
    chat = segments(alpaca, "alpaca", tok, True, "r")
    assert "user tell me about it\n\nthe dog" in chat[0][0]
    assert segments({"text": "a cat"}, "text", tok, False, "r") == [("a cat<|im_end|>", True)]
    assert detect_format({"instruction", "output"}, "sft", "d") == "alpaca"
    assert detect_format({"messages", "id"}, "sft", "d") == "messages"
    assert infer_task({"text", "label"}, "label") == "classify"
    assert infer_task({"prompt", "completion", "label"}, "label") == "sft"
    with pytest.raises(LoraError, match="found the fields \\['q'\\]"):
        detect_format({"q"}, "sft", "d")


def test_truncation_is_counted_and_examples_without_targets_dropped():
    tok = word_tokenizer(chat=False)
    records = [{"prompt": "the cat " * 10, "completion": "yes"},      # prompt alone fills 8 tokens
               {"prompt": "hi", "completion": "one two three four five six seven eight nine"},
               {"prompt": "hi", "completion": "no"}]
    enc = encode_sft(records, "prompt-completion", tok, False, 8, False, "d")
    assert (enc.dropped, enc.truncated, len(enc)) == (1, 1, 2)
    assert max(len(i) for i in enc.ids) == 8
    with pytest.raises(LoraError, match="longer than --max-seq-len 4"):
        encode_sft(records[1:2] * 2, "prompt-completion", tok, False, 4, False, "d")


def test_classification_labels_map_and_unseen_label():
    tok = word_tokenizer()
    rows = [{"text": "good movie", "label": "pos"}, {"text": "bad movie", "label": "neg"}]
    enc, label_map = encode_classify(rows, tok, "text", "label", None, 16, "d")
    assert label_map == {"neg": 0, "pos": 1} and enc.labels == [1, 0]
    with pytest.raises(LoraError, match="'meh'"):
        encode_classify([{"text": "fun", "label": "meh"}], tok, "text", "label", label_map, 16, "v")


def _sft_data(n=10):
    tok = word_tokenizer()
    enc = encode_sft(qa_records(n), "prompt-completion", tok, True, 64, False, "d")
    return tok, enc


def test_packed_loss_and_gradients_equal_unpacked():
    from lorakit.finetune.task import SFTTask
    tok, enc = _sft_data(7)
    model = tiny_llama(vocab=64, seed=5).train()
    padded = TokenData(enc, tok.pad_token_id)
    packed = TokenData(enc, tok.pad_token_id, pack=True, max_len=64)
    assert len(packed) < len(padded)                      # several examples share a row
    losses, grads = [], []
    for data in (padded, packed):
        task = SFTTask(data)
        batch = data.take(torch.arange(len(data)))
        model.zero_grad()
        loss = task.loss(task.forward(model, batch), batch)
        loss.backward()
        losses.append(loss.detach())
        grads.append(model.model.layers[0].self_attn.q_proj.weight.grad.clone())
    assert "position_ids" in packed.take(torch.arange(1)) and "attention_mask" not in packed.take(
        torch.arange(1))
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)
    # a packed row without the position resets would let examples attend to each other
    batch = packed.take(torch.arange(len(packed)))
    width = batch["input_ids"].shape[1]
    leaky = {**batch, "position_ids": torch.arange(width).expand_as(batch["input_ids"])}
    with torch.no_grad():
        wrong = SFTTask(packed).loss(SFTTask(packed).forward(model, leaky), leaky)
    assert abs(wrong.item() - losses[0].item()) > 1e-3


def test_length_grouped_batches_pad_less_cover_each_row_once_and_are_seeded():
    tok = word_tokenizer()
    rows = [{"prompt": "hi " * (1 + i % 13), "completion": "yes"} for i in range(200)]
    enc = encode_sft(rows, "prompt-completion", tok, True, 64, False, "d")
    grouped, shuffled = TokenData(enc, 2), TokenData(enc, 2, group_by_length=False)
    assert grouped.padding_fraction(8) < 0.5 * shuffled.padding_fraction(8)
    epoch = grouped.epoch_batches(8, seed=3, epoch=0)
    assert sorted(torch.cat(epoch).tolist()) == list(range(200))
    assert all(torch.equal(a, b) for a, b in zip(epoch, grouped.epoch_batches(8, seed=3, epoch=0)))
    assert torch.equal(grouped.batch_indices(200, 8, 3, 4), epoch[4])


def test_config_resolution_order_and_round_trip(tmp_path):
    (tmp_path / "run.toml").write_text('model = "m"\ndata = "d.jsonl"\nout = "o"\nr = 4\nmax-seq-len = 64\n')
    (tmp_path / "run.yaml").write_text("model: m\ndata: d.jsonl\nout: o\nr: 4\nmax_seq_len: 64\n")
    for name in ("run.toml", "run.yaml"):
        cfg = resolve({"r": 16}, str(tmp_path / name))
        assert (cfg.r, cfg.max_seq_len, cfg.alpha) == (16, 64, 16.0)          # flag > file > default
    quick = resolve({"quick": True, "model": "m", "data": "d", "out": "o", "lr": 0.5})
    assert quick.max_steps == 30 and quick.lr == 0.5                          # flag > --quick
    (tmp_path / "config.json").write_text(json.dumps(quick.to_dict()))
    again = resolve({}, str(tmp_path / "config.json"))
    assert again == quick and config_differences(quick.to_dict(), again) == {}
    assert config_differences(quick.to_dict(), FinetuneConfig(**{**quick.to_dict(), "r": 2,
                                                                 "resume": True})) == {"r": (8, 2)}
    with pytest.raises(LoraError, match="--model is required"):
        resolve({"data": "d", "out": "o"})
    with pytest.raises(LoraError, match="unknown extension"):
        (tmp_path / "run.ini").write_text("")
        read_config_file(str(tmp_path / "run.ini"))


def test_tiny_end_to_end_cli_run_then_resume_and_generate(tmp_path, capsys):
    model = tiny_llama_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(40))
    out = tmp_path / "run"
    argv = ["finetune", "--model", model, "--data", data, "--out", out, "--max-steps", "6",
            "--batch-size", "4", "--lr", "0.01", "--checkpoint-every", "3", "--precision", "fp32",
            "--no-progress", "--samples", "2", "--sample-tokens", "4", "--pack", "--max-seq-len", "48"]
    assert run_cli(argv) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 6 and result["data"]["packed"]
    assert result["history"][-1]["val_loss"] < result["val_loss_before"]
    for name in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "adapter/tokenizer_config.json", "metrics.jsonl", "report.md", "loss.png",
                 "config.json"):
        assert (out / name).is_file(), name
    assert "| prompt | reference | before | after |" in (out / "report.md").read_text()
    saved = json.loads((out / "config.json").read_text())
    assert saved["pack"] and saved["max_seq_len"] == 48
    # --resume with the same configuration (via --config DIR/config.json) and more steps is refused
    # as a different configuration; with the same one it continues from the last checkpoint
    assert run_cli(["finetune", "--config", out / "config.json", "--resume", "--max-steps", "9"]) == 2
    assert "max_steps: 6 there, 9 now" in capsys.readouterr().err
    assert run_cli(["finetune", "--config", out / "config.json", "--resume"]) == 0
    capsys.readouterr()
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "what is the dog ?", "id": 1},
                                                  {"messages": [{"role": "user", "content": "hi"}]}])
    assert run_cli(["generate", "--model", model, "--adapter", out / "adapter", "--prompts", prompts,
                    "--out", tmp_path / "answers.jsonl", "--max-new-tokens", "5"]) == 0
    answers = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [a.get("id") for a in answers] == [1, None] and all("answer" in a for a in answers)


def test_conversational_prompt_completion_trains_the_completion_turns_only():
    tok = word_tokenizer()
    record = {"prompt": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": "why ?"}],
              "completion": [{"role": "assistant", "content": "no"}]}
    enc = encode_sft([record], "prompt-completion", tok, True, 64, False, "d")
    assert _trained_text(tok, enc.ids[0], enc.labels[0]) == "no <|im_end|>"


def test_classification_end_to_end_on_a_csv_saves_the_label_map(tmp_path, capsys):
    import csv
    from finetune_helpers import tiny_bert_dir
    model = tiny_bert_dir(tmp_path / "bert")
    with open(tmp_path / "reviews.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["text", "label"])
        for i in range(60):
            text = "great fun movie" if i % 2 else "awful boring movie"
            writer.writerow([text, ["rotten", "fresh"][i % 2]])
    out = tmp_path / "cls"
    assert run_cli(["finetune", "--model", model, "--data", tmp_path / "reviews.csv", "--out", out,
                    "--max-steps", "12", "--lr", "0.01", "--batch-size", "8", "--precision", "fp32",
                    "--no-progress", "--val-fraction", "0.2"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["task"] == "classify" and result["history"][-1]["val_accuracy"] == 1.0
    labels = json.loads((out / "adapter" / "label_map.json").read_text())
    assert labels["label2id"] == {"fresh": 0, "rotten": 1}
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["classifier"]
    capsys.readouterr()
    assert run_cli(["generate", "--model", model, "--adapter", out / "adapter", "--prompt", "hi"]) == 2
    assert "classification adapter" in capsys.readouterr().err


def test_grad_checkpoint_gives_the_same_loss_and_adapter_gradients():
    import copy
    from lorakit.finetune.model import add_lora
    from lorakit.finetune.task import SFTTask
    tok, enc = _sft_data(6)
    data = TokenData(enc, tok.pad_token_id)
    batch = data.take(torch.arange(len(data)))
    results = []
    base = tiny_llama(vocab=64, seed=6)
    for checkpointing in (False, True):
        cfg = FinetuneConfig(model="m", data="d", out="o", grad_checkpoint=checkpointing, r=4)
        torch.manual_seed(0)
        model = add_lora(copy.deepcopy(base), cfg, "sft").train()
        flag = getattr(model, "is_activation_checkpointing", None)
        assert (model.is_gradient_checkpointing if flag is None else flag) == checkpointing
        task = SFTTask(data)
        loss = task.loss(task.forward(model, batch), batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0])
    assert results[0][1].keys() == results[1][1].keys() and len(results[0][1]) > 0
    for name, grad in results[0][1].items():
        torch.testing.assert_close(grad, results[1][1][name], atol=1e-6, rtol=1e-5)


def test_quantized_base_trains_lora_on_top(tmp_path, capsys):
    model = tiny_llama_dir(tmp_path / "model")
    data = write_jsonl(tmp_path / "qa.jsonl", qa_records(24))
    out = tmp_path / "q"
    assert run_cli(["finetune", "--model", model, "--data", data, "--out", out, "--max-steps", "4",
                    "--quantize", "int8", "--lr", "0.01", "--precision", "fp32", "--no-progress",
                    "--samples", "1", "--sample-tokens", "3"]) == 0
    result = json.loads((out / "result.json").read_text())
    assert result["history"][-1]["val_loss"] < result["val_loss_before"]
    assert json.loads((out / "config.json").read_text())["quantize"] == "int8"
    capsys.readouterr()
    assert run_cli(["generate", "--model", model, "--adapter", out / "adapter", "--prompt", "hi",
                    "--max-new-tokens", "3", "--no-chat"]) == 0       # on the base quantized as recorded
    assert "trained on a quantized base (int8)" in capsys.readouterr().err
