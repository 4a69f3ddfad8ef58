"""Hugging Face ``Trainer`` and TRL's ``SFTTrainer`` with lorakit: checkpoints hold the adapter.

    model = lorakit.apply_lora(AutoModelForCausalLM.from_pretrained(...), cfg)
    lorakit.hf.prepare_for_trainer(model)            # once, before Trainer(model=model, ...)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data)
    trainer.train()                                  # checkpoint-N/: the adapter folder + optimizer state
    trainer.train(resume_from_checkpoint=True)       # resumes exactly (the same tensors, bit for bit)
    trainer.save_model("out")                        # out/: adapter_config.json + adapter_model.safetensors

PEFT gets the same from Trainer because Trainer recognises a ``PeftModel`` and calls its
``save_pretrained``. lorakit adapts the user's own model in place, so it hooks the same two places:

  - ``model.save_pretrained(dir)`` (what ``Trainer._save`` / ``save_model`` / ``push_to_hub`` call) writes
    the adapter folder in PEFT's layout: adapter "default" in ``dir``, any other adapter in
    ``dir/<name>``. It is an entry on the model instance; the class is untouched. Loadable with
    ``peft.PeftModel.from_pretrained(base, dir)`` and ``lorakit.load_adapter(base, dir)``.
  - ``Trainer._load_from_checkpoint`` / ``_load_best_model`` (wrapped once per process, for every
    Trainer subclass, TRL's included): a checkpoint holding an adapter folder is copied into the
    model's adapters in place (``lorakit.io.set_adapter_weights``); any other checkpoint, or a model
    without lorakit adapters, goes to transformers' own code unchanged.

Without ``prepare_for_trainer``, ``save_pretrained`` on an adapted model refuses with this advice (set up
by ``apply_lora``), because a full save would hold lorakit-internal keys that ``from_pretrained`` drops.
Sharded runs (FSDP, DeepSpeed ZeRO-3), whose Trainer passes a gathered ``state_dict``, are not covered.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from torch import nn

from lorakit.adapters import list_adapters
from lorakit.errors import LoraError
from lorakit.io import CONFIG_NAME, save_adapter, set_adapter_weights
from lorakit.state import has_lora

FULL_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def prepare_for_trainer(model: nn.Module) -> nn.Module:
    """Make ``model`` (with lorakit adapters) save and resume as an adapter under Trainer / SFTTrainer.
    Returns the model. Call it after apply_lora / load_adapter, before building the Trainer."""
    if not has_lora(model):
        raise LoraError("prepare_for_trainer: the model has no lorakit adapters yet; call "
                        "lorakit.apply_lora(model, cfg) (or load_adapter) first")
    writer = functools.partial(save_pretrained, model)
    writer.lorakit_hook = True                  # forget_lora removes it with the adapters
    model.__dict__["save_pretrained"] = writer
    patch_trainer()
    return model


def save_pretrained(model: nn.Module, save_directory: str | os.PathLike, *args,
                    is_main_process: bool = True, selected_adapters: list[str] | None = None,
                    **kwargs) -> None:
    """The adapter folder(s) in PEFT's layout; Trainer's ``state_dict`` and other options are ignored.
    A model whose adapters were all removed saves as the plain model it is again."""
    if not has_lora(model):
        return type(model).save_pretrained(model, save_directory, *args,
                                           is_main_process=is_main_process, **kwargs)
    if not is_main_process:
        return None
    names = list(selected_adapters or list_adapters(model))
    for name in names:
        save_adapter(model, adapter_folder(save_directory, name), adapter_name=name)
    return None


def adapter_folder(directory: str | os.PathLike, name: str) -> Path:
    """Where PEFT puts adapter ``name`` of a save: the folder itself for "default", else a subfolder."""
    return Path(directory) if name == "default" else Path(directory) / name


def is_adapter_checkpoint(folder: str | os.PathLike) -> bool:
    """True for a checkpoint that holds adapter folders and no full model weights."""
    folder = Path(folder)
    return folder.is_dir() and not any((folder / f).is_file() for f in FULL_WEIGHTS) and \
        any((folder / CONFIG_NAME).is_file() or (sub / CONFIG_NAME).is_file()
            for sub in [folder, *folder.iterdir()])


def load_checkpoint_adapters(model: nn.Module, folder: str | os.PathLike) -> list[str]:
    """Copy each of the model's adapters from its place in ``folder`` (``adapter_folder``) in place;
    returns the names loaded. An adapter the checkpoint lacks is refused before anything is copied."""
    names = list(list_adapters(model))
    missing = [n for n in names if not (adapter_folder(folder, n) / CONFIG_NAME).is_file()]
    if missing:
        raise LoraError(f"checkpoint {folder} has no adapter folder for {missing} (expected "
                        f"{[str(adapter_folder(folder, n)) for n in missing]}); it was saved from "
                        "another model or adapter setup")
    for name in names:
        set_adapter_weights(model, adapter_folder(folder, name), name)
    return names


def patch_trainer() -> None:
    """Wrap ``transformers.Trainer``'s two checkpoint loaders once (idempotent)."""
    import transformers  # deferred: heavy optional dependency
    trainer = transformers.Trainer
    if getattr(trainer._load_from_checkpoint, "lorakit_hook", False):
        return
    original_load, original_best = trainer._load_from_checkpoint, trainer._load_best_model

    @functools.wraps(original_load)
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        if has_lora(self.model) and is_adapter_checkpoint(resume_from_checkpoint):
            load_checkpoint_adapters(self.model, resume_from_checkpoint)
            return None
        return original_load(self, resume_from_checkpoint, model)

    @functools.wraps(original_best)
    def _load_best_model(self):
        best = self.state.best_model_checkpoint
        if has_lora(self.model) and best and is_adapter_checkpoint(best):
            load_checkpoint_adapters(self.model, best)
            return None
        return original_best(self)

    _load_from_checkpoint.lorakit_hook = _load_best_model.lorakit_hook = True
    trainer._load_from_checkpoint, trainer._load_best_model = _load_from_checkpoint, _load_best_model
