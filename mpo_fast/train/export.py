"""What makes a checkpoint self-contained, and the model folders a run leaves (DESIGN.md §5).

    write_model_files(folder, model, tokenizer, processor)
        the tokenizer (or the VLM's processor, tokenizer included) and the generation config,
        written with their own ``save_pretrained`` next to a checkpoint's weights and
        config.json, so ``AutoModelForCausalLM.from_pretrained(ckpt)`` +
        ``AutoTokenizer.from_pretrained(ckpt)`` (or ``AutoProcessor``) load it; for a PEFT
        policy also its adapter (adapter_config.json + adapter_model.safetensors, what
        ``PeftModel.from_pretrained(base, ckpt)`` reads)
    export(out_dir, name, model, tokenizer, processor, state, lora_save)
        ``<out_dir>/<name>/`` (``final``, ``best``): the model as ``save_pretrained`` writes
        it (a PEFT policy: its adapter, or the merged model with ``lora_save="merged"``), the
        files above, trainer_state.json and a manifest.json written last (sha256 and size of
        every file, as a checkpoint's). Written into ``.tmp-<name>`` and renamed: a run killed
        midway leaves the previous folder whole.
"""

from __future__ import annotations

import copy
import json
import os
import shutil

__all__ = ["export", "is_peft", "trainer_state", "write_model_files"]


def is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def write_model_files(folder: str, model, tokenizer, processor, *, adapter: bool = True
                      ) -> None:
    """Tokenizer / processor, generation config (and a PEFT policy's adapter) into ``folder``."""
    if processor is not None and hasattr(processor, "save_pretrained"):
        processor.save_pretrained(folder)
    if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(folder)
    generation = getattr(model, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(folder)
    if adapter and is_peft(model):
        model.save_pretrained(folder)  # adapter_config.json, adapter_model.safetensors
        _drop_readme(folder)
    _fsync_tree(folder)


def trainer_state(step: int, total: int, history: list[dict], pairs_per_step: int,
                  epoch_pairs: int, best: dict | None = None, **extra) -> dict:
    """A record like the Hugging Face Trainer's trainer_state.json: global_step, max_steps,
    epoch, log_history, the best metric and checkpoint so far, plus ``extra``."""
    state = {"global_step": step, "max_steps": total,
             "epoch": step * pairs_per_step / max(epoch_pairs, 1),
             "log_history": [h for h in history if h.get("step", 0) <= step]}
    if best:
        state.update(best_metric=best.get("value"), best_model_checkpoint=best.get("path"),
                     best_global_step=best.get("step"), metric_for_best_model=best.get("metric"),
                     best=best)
    return {**state, **extra}


def export(out_dir: str, name: str, model, tokenizer, processor, state: dict,
           lora_save: str = "adapter", checkpoint: str | None = None) -> str:
    """Write ``<out_dir>/<name>/`` (see the module docstring); returns its path. A full
    fine-tune's weights are copied from ``checkpoint`` (the run's checkpoint of this step,
    already full tensors under the Hugging Face names, whatever the process count) when given;
    a PEFT policy's come from the policy itself."""
    from .checkpoint import MANIFEST, _manifest, _write

    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".tmp-{name}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save = model
    if is_peft(model) and lora_save == "merged":
        save = copy.deepcopy(model).merge_and_unload()
    if checkpoint is not None and not is_peft(model):
        for file in ("model.safetensors", "config.json"):
            if os.path.exists(os.path.join(checkpoint, file)):
                shutil.copyfile(os.path.join(checkpoint, file), os.path.join(tmp, file))
    else:
        save.save_pretrained(tmp)
        _drop_readme(tmp)
    write_model_files(tmp, save, tokenizer, processor, adapter=False)
    _write(os.path.join(tmp, "trainer_state.json"),
           lambda f: f.write(json.dumps(state, indent=1, default=str).encode()))
    _write(os.path.join(tmp, MANIFEST), lambda f: f.write(_manifest(tmp, state.get(
        "global_step", 0))))
    if os.path.isdir(final):
        old = os.path.join(out_dir, f".tmp-old-{name}")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.rename(tmp, final)
    return final


def _drop_readme(folder: str) -> None:
    """PEFT writes a model-card README.md template; the run's folders do without it."""
    path = os.path.join(folder, "README.md")
    if os.path.exists(path):
        os.remove(path)


def _fsync_tree(folder: str) -> None:
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
