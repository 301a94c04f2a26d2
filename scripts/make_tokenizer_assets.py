"""Rebuild dbnb/assets/sd15/tokenizer/{vocab.json,merges.txt} from CLIP's BPE file.

The BPE vocabulary is OpenAI CLIP's, as carried (MIT licence) in the open_clip_torch wheel:
    pip download --no-deps open_clip_torch==3.3.0 -d /tmp/oc
    unzip -o /tmp/oc/*.whl 'open_clip/bpe_simple_vocab_16e6.txt.gz' -d /tmp/oc
    python scripts/make_tokenizer_assets.py /tmp/oc/open_clip/bpe_simple_vocab_16e6.txt.gz

The conversion follows CLIP's SimpleTokenizer: 256 byte symbols, the same with the
end-of-word marker, the first 48,894 merges, then the two special tokens: 49,408 ids.
"""
import gzip
import json
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "dbnb" / "assets" / "sd15" / "tokenizer"
N_MERGES = 49152 - 256 - 2


def bytes_to_unicode():
    """CLIP's reversible byte → printable-unicode table (GPT-2's)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def main(bpe_gz):
    merges = gzip.open(bpe_gz, "rt", encoding="utf-8").read().split("\n")[1 : N_MERGES + 1]
    merges = [tuple(m.split()) for m in merges]
    vocab = list(bytes_to_unicode().values())
    vocab += [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == 49408, len(vocab)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False), encoding="utf-8")
    (OUT / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    print(f"wrote {OUT}: {len(vocab)} tokens, {len(merges)} merges")


if __name__ == "__main__":
    main(sys.argv[1])
