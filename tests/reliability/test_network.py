"""No network at run time: loading and running a local checkpoint never opens a connection.

Checked in a fresh interpreter with the HF offline switches unset and transformers imported
before interp (so `import interp` cannot turn offline mode on), with every DNS lookup and socket
connect recorded and refused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import make_hf, word_tokenizer

PROBE = r"""
import json, socket, sys
attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args[:2]))
    raise OSError("network disabled by the test")

socket.getaddrinfo = refuse
socket.socket.connect = refuse
socket.create_connection = refuse

import transformers  # first: interp's setdefault of HF_HUB_OFFLINE comes too late to matter
import interp

model = interp.load(sys.argv[1])
logits = model(model.to_tokens("the cat sat"))
print(json.dumps({"attempts": attempts, "shape": list(logits.shape)}))
"""


def test_loading_a_local_checkpoint_makes_no_network_attempt(tmp_path: Path):
    directory = tmp_path / "tiny-llama"
    make_hf("llama").save_pretrained(directory)
    word_tokenizer().save_pretrained(directory)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    done = subprocess.run([sys.executable, "-c", PROBE, str(directory)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert result["shape"][:2] == [1, 3]
