"""The reference for tests/tokenizer.rs' SentencePiece tests: the `sentencepiece` package itself.

Reads {"strings": [...]} on stdin. Trains small SentencePiece BPE models the way Llama's was
trained (byte fallback, identity normalization, spaces kept, digits split, `<unk>` `<s>` `</s>` as
ids 0-2), one with the dummy prefix and one without, on a fixed corpus made here; prints for each
its pieces (text, score, llama.cpp token type) and, for every string, `encode` ids and the `decode`
of those ids, as JSON on stdout.

Run with the `.venv` python that scripts/test.sh makes (it installs `sentencepiece`).
"""

import io
import json
import random
import sys

try:
    import sentencepiece as spm
except ImportError:
    sys.exit(
        "the `sentencepiece` package is missing from this python; run scripts/test.sh once "
        "(it creates .venv with it)"
    )

# llama.cpp's token types (tokenizer.ggml.token_type).
NORMAL, UNKNOWN, CONTROL, UNUSED, BYTE = 1, 2, 3, 5, 6

WORDS = (
    "the quick brown fox jumps over lazy dog while seven wizards quietly hex jovial bishop "
    "tokenizer model server adapter request stream batch token space digit number hello world "
    "Café naïve résumé façade coöperate Zürich München 日本語 東京 테스트 한국어 ½ — … “quotes” "
    "don't it's we're (parens) [brackets] {braces} a+b=c x*y/z 50% $100 #tag @user e-mail"
).split()


def corpus():
    rng = random.Random(20240531)
    lines = []
    for _ in range(600):
        parts = []
        for _ in range(rng.randint(3, 14)):
            r = rng.random()
            if r < 0.12:
                parts.append(str(rng.randint(0, 99999)))
            elif r < 0.17:
                parts.append(rng.choice(WORDS).upper())
            else:
                parts.append(rng.choice(WORDS))
        sep = "  " if rng.random() < 0.2 else " "
        line = sep.join(parts) + rng.choice([".", "!", "?", ",", ":", ";", ""])
        if rng.random() < 0.15:
            line = "  " + line
        lines.append(line)
    return lines


def train(add_dummy_prefix):
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus()),
        model_writer=buf,
        model_type="bpe",
        vocab_size=700,
        hard_vocab_limit=False,
        character_coverage=1.0,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=add_dummy_prefix,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        num_threads=1,
        minloglevel=2,
    )
    return spm.SentencePieceProcessor(model_proto=buf.getvalue())


def token_type(sp, i):
    if sp.is_unknown(i):
        return UNKNOWN
    if sp.is_control(i):
        return CONTROL
    if sp.is_byte(i):
        return BYTE
    if sp.is_unused(i):
        return UNUSED
    return NORMAL


def describe(sp, add_dummy_prefix, strings):
    pieces = [
        [sp.id_to_piece(i), sp.get_score(i), token_type(sp, i)]
        for i in range(sp.get_piece_size())
    ]
    cases = []
    for text in strings:
        ids = sp.encode(text)
        cases.append({"text": text, "ids": ids, "decoded": sp.decode(ids)})
    return {
        "add_dummy_prefix": add_dummy_prefix,
        "pieces": pieces,
        "unk_id": sp.unk_id(),
        "bos_id": sp.bos_id(),
        "eos_id": sp.eos_id(),
        "cases": cases,
    }


def main():
    strings = json.load(sys.stdin)["strings"]
    models = [describe(train(prefix), prefix, strings) for prefix in (True, False)]
    json.dump(
        {"sentencepiece": spm.__version__, "models": models}, sys.stdout, ensure_ascii=True
    )


if __name__ == "__main__":
    main()
