"""Reference token ids for the Rust tokenizer parity test (crates/albef-data/tests/tokenizer.rs).

Usage: python tokenize_ref.py VOCAB OUT.json [TOKENIZER_JSON]

Builds `BertTokenizerFast` from the BERT vocab.txt VOCAB with do_lower_case=True (what ALBEF's
`BertTokenizer.from_pretrained('bert-base-uncased')` amounts to; nothing is downloaded) and
writes, for every caption of CAPTIONS (the one list of test captions), the wordpiece ids without
special tokens and the ids of `tokenizer(caption, truncation=True, max_length=MAX_LENGTH)`.
With TOKENIZER_JSON it also saves the backend tokenizer there as a tokenizer.json.
"""

import json
import os
import sys
from pathlib import Path

# Never reach the network: the tokenizer is built from the local vocab file.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import tokenizers  # noqa: E402
import transformers  # noqa: E402
from transformers import BertTokenizerFast  # noqa: E402

MAX_LENGTH = 25

LONG = (
    "a man in a red shirt and blue jeans is riding a bicycle down a busy city street while "
    "people walk on the sidewalk next to tall buildings and a woman with a black dog waits "
    "at the corner near a yellow taxi as the sun sets behind the old church and two children "
    "play with a ball in the small park across the road"
)

CAPTIONS = [
    "A man riding a wave on top of a surfboard.",
    "Café crème à la Noël",
    "naïve façade",
    "ÉLAN and CAFÉ in capitals",
    "cafe\u0301 with a combining accent",
    "\u201cquotes\u201d \u2014 em dash \u2026 \u00bfque? \u00a1si!",
    "\u2018single\u2019 quotes and \u00abguillemets\u00bb",
    "一只猫",
    "一只猫 sitting on a mat",
    "猫和狗 cat and dog",
    "ThE QuIcK BrOwN FoX jumps over the LAZY dog",
    "2 dogs and 10 cats in 1999, 3.14 pizzas",
    "a xylophone and a zyzzyva near qwertyuiop",
    "playing running jumped walked cats dogs",
    "unbelievably unhappy surfers",
    "  lots   of\tspaces\nand\r\nnewlines  \u00a0nbsp\u3000ideographic space ",
    "control\u0000chars\u0007here\u001b and \ufffd replacement \u200bzero width",
    "",
    "   \t\n ",
    "It's a dog's life (really) - isn't it? yes!",
    "red-and-white / striped ~ \"shirt\"? #1; *the* best: <person>",
    "[MASK] and [CLS] as literals, [mask] lowercase, [UNK]",
    "emoji \U0001f436 dog \U0001f600",
    "ｆｕｌｌｗｉｄｔｈ letters and ﬁ ligature",
    "ねこ と いぬ and 고양이",
    "Straße groß",
    "a" * 101 + " is too long but " + "b" * 100 + " is not",
    LONG,
    LONG.upper() + " !!!",
    ", ".join(["cat"] * 40),
]


def vocab_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as f:
        return len(f.readlines())


def build(path: Path) -> tuple[BertTokenizerFast, str]:
    n = vocab_lines(path)
    tok = BertTokenizerFast(vocab_file=str(path), do_lower_case=True)
    construction = "vocab_file"
    if len(tok) != n:
        # transformers 5 ignores `vocab_file` in the constructor and silently builds a
        # 5-token default vocabulary; `vocab=<path>` is the path from_pretrained takes.
        tok = BertTokenizerFast(vocab=str(path), do_lower_case=True)
        construction = "vocab"
    assert len(tok) == n, f"tokenizer has {len(tok)} tokens, {path} has {n} lines"
    return tok, construction


def main() -> None:
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    vocab, out = Path(sys.argv[1]), Path(sys.argv[2])
    tok, construction = build(vocab)
    cases = []
    for caption in CAPTIONS:
        ids = tok(caption, add_special_tokens=False)["input_ids"]
        with_sep = tok(caption, truncation=True, max_length=MAX_LENGTH)["input_ids"]
        cases.append({"caption": caption, "ids": ids, "ids_sep_truncated": with_sep})
    special = {t: tok.convert_tokens_to_ids(t) for t in ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]}
    result = {
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "construction": construction,
        "vocab_size": len(tok),
        "special_ids": special,
        "max_length": MAX_LENGTH,
        "cases": cases,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    if len(sys.argv) == 4:
        # Saved after the truncating calls: the file then carries truncation settings, which a
        # loader must drop to keep whole sequences.
        tok.backend_tokenizer.save(sys.argv[3])


if __name__ == "__main__":
    main()
