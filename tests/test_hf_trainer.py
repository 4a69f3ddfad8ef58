"""transformers.Trainer and TRL's SFTTrainer with lorakit (issue 16, items 1, 2 and 6).

A few optimizer steps of a tiny random BERT classifier / Llama on CPU (seconds): checkpoints and
``save_model`` hold the PEFT-format adapter folder, which PEFT and lorakit load to the same outputs;
resuming from a checkpoint ends bit for bit where the uninterrupted run ends; ``save_pretrained`` on an
adapted model writes the adapter (after prepare_for_trainer) or refuses with advice (before).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import lorakit  # noqa: E402
from conftest import tiny_bert  # noqa: E402

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors"}


class Rows(torch.utils.data.Dataset):
    """16 token sequences with a class label each: what Trainer's default collator stacks."""

    def __init__(self, n: int = 16, seq: int = 8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 100, (n, seq), generator=g)
        self.labels = self.ids[:, 0] % 3

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def classifier():
    torch.manual_seed(0)
    return tiny_bert("BertForSequenceClassification", num_labels=3)


def adapted_classifier():
    model = lorakit.apply_lora(classifier(), lorakit.LoraConfig(
        r=4, alpha=8, target_modules=["query", "value"], modules_to_save=["classifier"]))
    return lorakit.hf.prepare_for_trainer(model)


def trainer(model, out, eval_dataset=None, **overrides):
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=6, save_steps=3, per_device_train_batch_size=4,
        learning_rate=5e-3, logging_steps=1, report_to=[], use_cpu=True, seed=0, data_seed=0,
        dataloader_num_workers=0, save_strategy="steps", **overrides)
    return transformers.Trainer(model=model, args=args, train_dataset=Rows(), eval_dataset=eval_dataset)


def logits(model):
    model.eval()
    with torch.no_grad():
        return model(input_ids=Rows().ids[:4]).logits


def factors(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in lorakit.lora_state_dict(model).items()}


def test_trainer_checkpoints_and_save_model_hold_the_adapter(tmp_path):
    model = adapted_classifier()
    trainer(model, tmp_path / "run").train()
    want = logits(model)
    for step in (3, 6):
        files = {p.name for p in (tmp_path / "run" / f"checkpoint-{step}").iterdir()}
        assert ADAPTER_FILES <= files and "model.safetensors" not in files, files
    trainer(model, tmp_path / "x").save_model(str(tmp_path / "final"))
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "final").iterdir()}
    for folder in (tmp_path / "final", tmp_path / "run" / "checkpoint-6"):
        ours = lorakit.load_adapter(classifier(), folder)
        theirs = peft.PeftModel.from_pretrained(classifier(), str(folder))
        assert torch.equal(logits(ours), want)
        assert (logits(theirs) - want).abs().max() < 1e-5
    assert (logits(classifier()) - want).abs().max() > 1e-3, "training changed nothing"


def test_resume_from_an_adapter_checkpoint_is_exact(tmp_path):
    straight = adapted_classifier()
    trainer(straight, tmp_path / "straight").train()
    resumed = adapted_classifier()
    before = {n: p for n, p in resumed.named_parameters() if p.requires_grad}
    trainer(resumed, tmp_path / "resumed").train(
        resume_from_checkpoint=str(tmp_path / "straight" / "checkpoint-3"))
    assert all(p is before[n] for n, p in resumed.named_parameters() if p.requires_grad)
    got, want = factors(resumed), factors(straight)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_load_best_model_at_end_reads_the_adapter_checkpoint(tmp_path):
    model = adapted_classifier()
    run = trainer(model, tmp_path / "best", eval_dataset=Rows(8), eval_strategy="steps", eval_steps=3,
                  load_best_model_at_end=True, metric_for_best_model="loss", greater_is_better=True)
    run.train()
    best = run.state.best_model_checkpoint
    assert best and best.endswith("checkpoint-3")          # the higher eval loss: not the last state
    from safetensors.torch import load_file
    saved = load_file(f"{best}/adapter_model.safetensors")
    now = factors(model)
    assert saved.keys() == now.keys() and all(torch.equal(saved[k], now[k]) for k in now)


def test_save_pretrained_refuses_before_prepare_and_writes_the_adapter_after(tmp_path):
    model = lorakit.apply_lora(classifier(), lorakit.LoraConfig(r=4, target_modules=["query"]))
    with pytest.raises(lorakit.LoraError, match="prepare_for_trainer"):
        model.save_pretrained(str(tmp_path / "full"))
    assert not (tmp_path / "full").exists()
    lorakit.add_adapter(model, "other", lorakit.LoraConfig(r=2, target_modules=["value"]))
    lorakit.hf.prepare_for_trainer(model)
    model.save_pretrained(str(tmp_path / "adapters"))
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "adapters").iterdir()}
    assert ADAPTER_FILES <= {p.name for p in (tmp_path / "adapters" / "other").iterdir()}
    plain = lorakit.merge_and_unload(model)                 # no adapters: an ordinary save again
    plain.save_pretrained(str(tmp_path / "merged"))
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_full_model_checkpoint_gets_the_right_advice(tmp_path):
    """Item 2: a Trainer checkpoint of the whole model (model.safetensors + training_args.bin) is named
    for what it is, with what to do instead, not a pickle to convert."""
    model = lorakit.apply_lora(classifier(), lorakit.LoraConfig(r=4, target_modules=["query"]))
    type(model).save_pretrained(model, str(tmp_path))            # what Trainer wrote before lorakit.hf
    torch.save({"args": 1}, tmp_path / "training_args.bin")
    with pytest.raises(lorakit.LoraError) as err:
        lorakit.load_adapter(classifier(), tmp_path)
    message = str(err.value)
    assert "full-model checkpoint" in message and "lorakit's own keys" in message
    assert "prepare_for_trainer" in message and "training_args.bin" not in message


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(97)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>",
                                                eos_token="<eos>", unk_token="<unk>")


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, pad_token_id=0, eos_token_id=1)
    return transformers.LlamaForCausalLM(config)


def test_trl_sft_trainer_without_peft_config_saves_the_adapter(tmp_path):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 97, (10,), generator=g)) for _ in range(8)]
    model = lorakit.hf.prepare_for_trainer(lorakit.apply_lora(
        _llama(), lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"])))
    args = trl.SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=4, save_steps=2,
                         per_device_train_batch_size=4, learning_rate=5e-3, report_to=[], use_cpu=True,
                         logging_steps=1, seed=0, dataloader_num_workers=0, max_length=16, bf16=False)
    sft = trl.SFTTrainer(model=model, args=args, processing_class=_tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_dict({"text": texts}))
    sft.train()
    ckpt = tmp_path / "sft" / "checkpoint-4"
    assert ADAPTER_FILES <= {p.name for p in ckpt.iterdir()}
    assert "model.safetensors" not in {p.name for p in ckpt.iterdir()}
    ids = torch.randint(2, 100, (2, 6), generator=g)
    model.eval()
    with torch.no_grad():
        want = model(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(_llama(), str(ckpt)).eval()(input_ids=ids).logits
        ours = lorakit.load_adapter(_llama().eval(), ckpt)(input_ids=ids).logits
    assert torch.equal(ours, want) and (theirs - want).abs().max() < 1e-5


# --- item 6: activation checkpointing with reentrant checkpoints, inputs that are not token ids -------
def _vit():
    config = transformers.ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32,
                                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                    num_labels=3)
    return transformers.ViTForImageClassification(config), {"pixel_values": torch.randn(2, 3, 16, 16)}


def _whisper_encoder():
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    config = transformers.WhisperConfig(num_mel_bins=8, d_model=32, encoder_layers=2,
                                        encoder_attention_heads=4, encoder_ffn_dim=64,
                                        max_source_positions=16)
    return WhisperEncoder(config), {"input_features": torch.randn(2, 8, 32)}


@pytest.mark.parametrize("order", ["checkpointing-first", "lora-first"])
@pytest.mark.parametrize("build, targets", [(_vit, ["q_proj", "v_proj"]),
                                            (_whisper_encoder, ["q_proj", "v_proj"])],
                         ids=["vit", "whisper-encoder"])
def test_reentrant_checkpointing_still_trains_every_lora_factor(build, targets, order):
    torch.manual_seed(0)
    model, inputs = build()
    model.train()
    cfg = lorakit.LoraConfig(r=4, target_modules=targets)
    if order == "lora-first":
        lorakit.apply_lora(model, cfg)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if order == "checkpointing-first":
        lorakit.apply_lora(model, cfg)
    with torch.no_grad():                              # B = 0 at init would hide A's gradient
        for name, p in model.named_parameters():
            if name.endswith(".B"):
                p.normal_(std=0.1)
    out = model(**inputs)
    (out.logits if hasattr(out, "logits") else out.last_hidden_state).square().mean().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert len(grads) == 8
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values()), \
        [n for n, g in grads.items() if g is None]
    hooks = model.__dict__["_lorakit_input_grads"]
    lorakit.merge_and_unload(model)                    # the hook goes with the adapters
    assert hooks and "_lorakit_input_grads" not in model.__dict__
