"""The GPT-NeoX-20B tokenizer (Pythia's), loaded offline from a local ``tokenizer.json`` or from the hub (spec §3).

The tokenizer keeps its own 50,277 ids; the model pads its embedding to 50,304 (a multiple of 128), so padding
is a model concern and never appears here. The end-of-document (EOD) token is the tokenizer's EOS,
``<|endoftext|>`` = id 0 for GPT-NeoX-20B.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerFast

# GPT-NeoX's tokenizer.json carries no special-token roles; its hub config names this token bos, eos and unk.
NEOX_EOD_TOKEN = "<|endoftext|>"


def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else that does not exist is a missing local path."""
    return name.startswith(("/", ".", "~")) or name.endswith(".json") or name.count("/") > 1


def load_tokenizer(name_or_path: str | os.PathLike) -> PreTrainedTokenizerFast:
    """A fast tokenizer from a directory holding ``tokenizer.json``, a ``tokenizer.json`` file, or a hub id.

    Local paths load offline. A bare ``tokenizer.json`` (as Pythia ships it) gets ``<|endoftext|>`` as its
    bos/eos/unk token when it has that token, as the hub config of EleutherAI/gpt-neox-20b does.
    """
    name = str(name_or_path)
    path = Path(name).expanduser()
    if path.is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path))
    elif path.is_dir() and (path / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    elif path.is_dir() and (path / "tokenizer.json").is_file():
        tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))
    elif path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} has no tokenizer.json (nor tokenizer_config.json)")
    elif _looks_like_path(name):
        raise FileNotFoundError(
            f"tokenizer path {path} does not exist; point the config value `data.tokenizer` at a directory with "
            f"tokenizer.json (the shared copy is ../shared/data/tokenizers/gpt-neox-20b, see its SOURCES.md) or "
            f"at a hub id such as EleutherAI/gpt-neox-20b when online"
        )
    else:
        try:
            tokenizer = AutoTokenizer.from_pretrained(name)
        except OSError as err:
            raise OSError(
                f"{name!r} is neither a local tokenizer path nor loadable from the Hugging Face hub ({err}); "
                f"offline, use a local directory holding tokenizer.json"
            ) from err
    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise TypeError(f"{name!r} loaded as {type(tokenizer).__name__}; a fast (tokenizers) tokenizer is needed")
    if tokenizer.eos_token is None and NEOX_EOD_TOKEN in tokenizer.get_vocab():
        tokenizer.add_special_tokens(
            {"bos_token": NEOX_EOD_TOKEN, "eos_token": NEOX_EOD_TOKEN, "unk_token": NEOX_EOD_TOKEN}
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token, which documents need as their separator (EOD)")
    return tokenizer


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerFast) -> str:
    """A short hash of everything that decides token ids: the serialized tokenizer and its EOD id."""
    serialized = tokenizer.backend_tokenizer.to_str() + f"|eod={tokenizer.eos_token_id}"
    return hashlib.sha256(serialized.encode()).hexdigest()[:16]
