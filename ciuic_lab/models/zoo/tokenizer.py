"""The embedded models' tokenizer: byte-level BPE trained on the corpus's training text.

Byte-level, so any text round-trips; one special token, ``<|endoftext|>`` (id 0), which separates
documents in training and is prepended to every encoded text (a text starts where a file starts).
The tokenizer is saved in the transformers layout (``tokenizer.json`` + ``tokenizer_config.json``)
and loads with ``AutoTokenizer.from_pretrained``.

``python -m ciuic_lab.models.zoo.tokenizer --corpus DIR`` trains it into ``DIR/tokenizer`` and
encodes the corpus into ``DIR/train_ids.npy`` and ``DIR/heldout_ids.npy`` (uint16), the files the
trainer reads.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from ...errors import CiuicError
from .corpus import SEPARATOR, load_manifest, split_documents

VOCAB_SIZE = 8192
MODEL_MAX_LENGTH = 512
TOKENIZER_DIR = "tokenizer"
IDS_FILES = {"train": "train_ids.npy", "heldout": "heldout_ids.npy"}


def train_tokenizer(documents, vocab_size: int = VOCAB_SIZE, model_max_length: int = MODEL_MAX_LENGTH):
    """Train a byte-level BPE on ``documents`` (an iterable of str); return a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if not 256 + 1 < vocab_size <= 65535:
        raise CiuicError(f"vocab_size={vocab_size} is out of range; accepted: 258..65535 (ids are stored as uint16)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[SEPARATOR],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    eot = tok.token_to_id(SEPARATOR)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SEPARATOR} $A", pair=f"{SEPARATOR} $A {SEPARATOR} $B:1", special_tokens=[(SEPARATOR, eot)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SEPARATOR,
        eos_token=SEPARATOR,
        pad_token=SEPARATOR,
        model_max_length=model_max_length,
        clean_up_tokenization_spaces=False,
    )


def encode_documents(tokenizer, documents, eot_id: int) -> np.ndarray:
    """Token ids of ``documents`` joined by ``eot_id`` (one before each document), as uint16."""
    backend = tokenizer.backend_tokenizer
    encs = backend.encode_batch(list(documents), add_special_tokens=False)
    n = sum(len(e.ids) + 1 for e in encs)
    out = np.empty(n, dtype=np.uint16)
    i = 0
    for e in encs:
        out[i] = eot_id
        out[i + 1 : i + 1 + len(e.ids)] = e.ids
        i += 1 + len(e.ids)
    return out


def prepare(corpus_dir: str | Path, vocab_size: int = VOCAB_SIZE, force: bool = False) -> dict:
    """Train the tokenizer and encode the corpus unless already done; return a summary."""
    from transformers import AutoTokenizer

    corpus_dir = Path(corpus_dir)
    manifest = load_manifest(corpus_dir)
    tok_dir = corpus_dir / TOKENIZER_DIR
    texts = {k: (corpus_dir / f"{k}.txt").read_text(encoding="utf-8") for k in IDS_FILES}
    summary_path = corpus_dir / "tokens.json"
    if not force and (tok_dir / "tokenizer.json").is_file() and summary_path.is_file():
        asked = json.loads(summary_path.read_text(encoding="utf-8")).get("requested_vocab_size")
        if asked is not None and asked != vocab_size:
            raise CiuicError(
                f"{tok_dir} holds a tokenizer trained for vocab_size={asked}, not {vocab_size}; accepted: "
                f"--vocab-size {asked}, or retrain with python -m ciuic_lab.models.zoo.tokenizer --force"
            )
    if force or not (tok_dir / "tokenizer.json").is_file():
        tok = train_tokenizer(split_documents(texts["train"]), vocab_size)
        tok.save_pretrained(tok_dir)
        for fname in IDS_FILES.values():
            (corpus_dir / fname).unlink(missing_ok=True)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    eot = tok.convert_tokens_to_ids(SEPARATOR)
    summary = {"vocab_size": len(tok), "requested_vocab_size": vocab_size, "corpus_sha256": manifest["corpus_sha256"],
               "tokens": {}}
    for k, fname in IDS_FILES.items():
        path = corpus_dir / fname
        if force or not path.is_file():
            np.save(path, encode_documents(tok, split_documents(texts[k]), eot))
        ids = np.load(path, mmap_mode="r")
        summary["tokens"][k] = int(ids.shape[0])
    summary["bytes_per_token"] = round(manifest["bytes"]["train"] / summary["tokens"]["train"], 3)
    summary_path.write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m ciuic_lab.models.zoo.tokenizer", description=__doc__.split("\n")[0])
    ap.add_argument("--corpus", required=True, help="a corpus directory built by ciuic_lab.models.zoo.corpus")
    ap.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    ap.add_argument("--force", action="store_true", help="retrain and re-encode even if present")
    args = ap.parse_args(argv)
    print(json.dumps(prepare(args.corpus, args.vocab_size, args.force)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
