"""The C++ tokenizer (cpp/tokenizer) against Hugging Face `tokenizers`, token for token.

The library is built with cmake into the cache (keyed by its sources) and driven through its test driver
`tda_tokenize`, one process per tokenizer: every case goes in as one JSON line and comes back as one.
"""
import hashlib
import json
import os
import random
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "cpp" / "tokenizer"
MODELS = ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)]
# No Llama-2 or Mistral checkpoint exists here: their tokenizer.json formats are rebuilt around a BPE trained on the
# project's text (sentencepiece_tokenizer below), which gives them the same pipeline with a smaller vocabulary.
SENTENCEPIECE_STYLES = ["llama2-style", "mistral-style", "transformers-llama"]
SP = "\u2581"  # sentencepiece's word-boundary mark
EVALUATION_CHARS = {"transformers-llama": 200_000}  # same pipeline as mistral-style: a slice of the split suffices


def _compiler():
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="session")
def driver():
    prebuilt = os.environ.get("TDA_TOKENIZE_DRIVER")  # e.g. a sanitizer build: the tests run unchanged on it
    if prebuilt:
        return Path(prebuilt)
    if not shutil.which("cmake"):
        pytest.skip("cmake not found: the C++ tokenizer cannot be built")
    if not _compiler():
        pytest.skip("no C++ compiler (c++, g++ or clang++) found: the C++ tokenizer cannot be built")
    from tda_export.text import cache_dir

    digest = hashlib.sha256()
    for path in sorted(p for p in SOURCE.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(SOURCE)).encode() + b"\0" + path.read_bytes())
    build = cache_dir() / "cpp-tokenizer" / digest.hexdigest()[:16]
    exe = build / "tda_tokenize"
    if not exe.exists():  # the driver is linked last: its presence means a complete build
        for cmd in (["cmake", "-S", str(SOURCE), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release"],
                    ["cmake", "--build", str(build), "-j2"]):
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode:
                pytest.fail(f"{' '.join(cmd)} failed (Debian needs nlohmann-json3-dev libpcre2-dev):\n"
                            f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return exe


def run_driver(exe, *args):
    return subprocess.run([str(exe), *map(str, args)], capture_output=True, timeout=300)


def run_cases(exe, tokenizer_json, cases, tmp_path):
    """One driver process for all cases; returns its answer to each."""
    path = tmp_path / "cases.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in cases))
    r = run_driver(exe, tokenizer_json, "cases", path)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    answers = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(answers) == len(cases)
    return answers


@pytest.fixture(scope="session")
def saved_tokenizer(tmp_path_factory):
    """model name -> tokenizer.json written the way an engine build writes it (models.save_tokenizer)."""
    made = {}

    def get(model):
        if model not in made:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from transformers import AutoTokenizer

            from tda_export.models import resolve, save_tokenizer

            src = resolve(model)
            kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
            out = tmp_path_factory.mktemp(model)
            save_tokenizer(AutoTokenizer.from_pretrained(src.directory, **kw), out)
            made[model] = out / "tokenizer.json"
        return made[model]

    return get


EDGE_TEXTS = [
    "", " ", "     ", "\n", "\n\n\n\n", "\t", "\t\t x", " \n \n", "\r\n", "a  b   c    d     e",
    "  leading spaces", "trailing spaces   ", "line one\nline two\r\nline three\r", "tabs\tinside\twords\t\t",
    "café naïve Ünïcödé Ærøskøbing straße", "Combining e\u0301 and precomposed é", "日本語のテキスト、中文句子。",
    "한국어 텍스트", "emoji 🤗 👍🏽 👨‍👩‍👧 🇫🇷", "Привет, мир! مرحبا שלום ελληνικά", "numbers 1234567890 3.14159 1,000,000",
    "don't I'll we're they've she'd it's 'quoted' DON'T", "NBSP\u00a0here, thin\u2009space, ideographic\u3000space",
    "zero\u200bwidth\u200djoiner", "▁already▁marked ▁", "\x00 nul and \x7f del \x1b esc", "x" * 3000,
    " ".join(["word"] * 500), "a" + "\u0301" * 50, "😀" * 40, "<", "<|", "<bos", "</s>", "<0x41>",
    " " * 20_000, "\n" * 5_000 + "x", " \n" * 5_000, "y" * 20_000,  # long runs: regex backtracking, one huge word
]
INVALID_UTF8 = [b"abc\xff def", b"\xe2\x82", b"ok \xc0\xaf", b"\xed\xa0\x80 surrogate", b"\xf4\x90\x80\x80", b"\x80"]


def special_texts(hf):
    """Texts holding the file's added tokens, whole, repeated, adjacent and truncated."""
    added = hf.get_added_tokens_decoder()
    special = [t.content for t in added.values() if t.special][:6]
    plain = [t.content for t in added.values() if not t.special][:6]
    texts = []
    for a, b in zip(special + plain, (special + plain)[1:] + special[:1]):
        texts += [a, f"{a}hello {b}world{a}{a}", f" {a} x {b}\n", a[:-1] + " tail", f"pre{a[1:]}"]
    return texts


@pytest.fixture(scope="session")
def sentencepiece_tokenizer(tmp_path_factory):
    """style -> tokenizer.json of a sentencepiece-converted BPE as Llama-2 and Mistral checkpoints carry.

    The BPE (byte fallback, fused <unk>, <s> and </s>) is trained on the calibration text; as in Llama's vocabulary
    the 256 <0xXX> tokens are model tokens, not added ones, and runs of the mark are tokens merged first.
    - llama2-style: Llama-2-7b-hf's file (the legacy conversion): normalizer Prepend(mark) + Replace(" ", mark),
      no pre-tokenizer;
    - mistral-style: the non-legacy conversion (transformers >= 4.38) newer Mistral files carry: Metaspace
      (prepend_scheme "first", split false) and no normalizer, with [INST] control tokens;
    - transformers-llama: what an engine build writes (models.save_tokenizer) for a Llama tokenizer with the
      installed transformers.
    All three decode with Replace(mark, " "), ByteFallback, Fuse, Strip(" ", 1, 0) and add <s> by a template.
    """
    made = {}

    def get(style):
        if style in made:
            return made[style]
        from tokenizers import AddedToken, Tokenizer

        from tda_export.models import save_tokenizer

        doc = json.loads(_sentencepiece_bpe())
        out = tmp_path_factory.mktemp(style)
        if style == "transformers-llama":
            save_tokenizer(_transformers_llama(doc), out)
        else:
            tok = _as_style(Tokenizer.from_str(json.dumps(doc)), style)
            if style == "mistral-style":
                tok.add_special_tokens([AddedToken("[INST]", normalized=False, special=True),
                                        AddedToken("[/INST]", normalized=False, special=True)])
            tok.save(str(out / "tokenizer.json"))
        made[style] = out / "tokenizer.json"
        return made[style]

    return get


def _train_sentencepiece_bpe(vocab_size, limit_alphabet, chars):
    """A byte-fallback BPE with <unk>, <s>, </s>, trained on the calibration text split at the mark."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from tda_export.text import corpus

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, limit_alphabet=limit_alphabet, show_progress=False,
                                  special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)])
    tok.train_from_iterator([corpus("calibration")[:chars]], trainer)
    return tok


def _as_style(tok, style):
    """`tok` with the pipeline of llama2-style or mistral-style (see sentencepiece_tokenizer)."""
    from tokenizers import decoders, normalizers, pre_tokenizers, processors

    if style == "llama2-style":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP), normalizers.Replace(" ", SP)])
        tok.pre_tokenizer = None
    else:
        tok.normalizer = None
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SP, prepend_scheme="first", split=False)
    tok.decoder = decoders.Sequence([decoders.Replace(SP, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s>:1 $B:1",
                                                       special_tokens=[("<s>", 1)])
    return tok


def _transformers_llama(doc):
    """transformers' Llama tokenizer over the vocabulary and merges of tokenizer.json `doc`."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaTokenizer

    merges = [tuple(m) for m in doc["model"]["merges"]]
    return LlamaTokenizer(vocab=doc["model"]["vocab"], merges=merges, add_bos_token=True)


@lru_cache(maxsize=1)
def _sentencepiece_bpe():
    """tokenizer.json text of the BPE the sentencepiece styles share (see sentencepiece_tokenizer)."""
    doc = json.loads(_train_sentencepiece_bpe(vocab_size=3000, limit_alphabet=60, chars=200_000).to_str())
    doc["added_tokens"] = [t for t in doc["added_tokens"] if t["content"] in ("<unk>", "<s>", "</s>")]
    vocab = doc["model"]["vocab"]
    for run in (SP * 2, SP * 4):
        vocab[run] = len(vocab)
    doc["model"]["merges"] = [[SP, SP], [SP * 2, SP * 2]] + doc["model"]["merges"]
    return json.dumps(doc)


@pytest.fixture(scope="module", params=MODELS + SENTENCEPIECE_STYLES)
def model_run(request, driver, saved_tokenizer, sentencepiece_tokenizer, tmp_path_factory):
    """All cases of one tokenizer: (hf tokenizer, {name: (case, answer)})."""
    import tokenizers

    from tda_export.text import corpus

    if request.param in SENTENCEPIECE_STYLES:
        path = sentencepiece_tokenizer(request.param)
    else:
        path = saved_tokenizer(request.param)
    hf = tokenizers.Tokenizer.from_file(str(path))
    evaluation = corpus("evaluation")
    if request.param in EVALUATION_CHARS:  # the whole split where it adds no other pipeline (CI time)
        evaluation = evaluation[:evaluation.index("\n", EVALUATION_CHARS[request.param]) + 1]
    eval_ids = hf.encode(evaluation, add_special_tokens=False).ids
    cases = {"evaluation": {"hex": evaluation.encode().hex(), "add_special": False},
             "evaluation_decode": {"ids": eval_ids, "skip": True},
             "evaluation_stream": {"ids": eval_ids[:4000], "skip": True}}
    for i, text in enumerate(EDGE_TEXTS + special_texts(hf)):
        for add in (True, False):
            cases[f"text{i}/{add}"] = {"hex": text.encode().hex(), "add_special": add, "text": text}
    for i, raw in enumerate(INVALID_UTF8):
        cases[f"invalid{i}"] = {"hex": raw.hex(), "raw": raw.hex()}
    rng = random.Random(0)
    size = hf.get_vocab_size()
    for i in range(40):
        ids = [rng.randrange(size) for _ in range(rng.randint(1, 64))]
        for skip in (True, False):
            cases[f"random{i}/{skip}"] = {"ids": ids, "skip": skip}
    cases["unknown_ids"] = {"ids": [eval_ids[0], size + 7, 10**9, eval_ids[1]], "skip": True}
    for name, ids in byte_pieces(hf).items():
        cases[f"bytes/{name}"] = {"ids": ids, "skip": True}
    vocab = hf.get_vocab()
    probe = sorted(vocab)[:: max(1, len(vocab) // 50)] + ["<bos>", "<|im_start|>", "no such token \u2603"]
    of_ids = sorted(hf.get_added_tokens_decoder())[:50] + list(range(0, size, max(1, size // 50))) + [size + 3]
    cases["vocab"] = {"tokens": probe, "of_ids": of_ids}
    answers = run_cases(driver, path, list(cases.values()), tmp_path_factory.mktemp("cases"))
    return hf, dict(zip(cases, zip(cases.values(), answers)))


def byte_pieces(hf):
    """Ids of single-byte tokens spelling '€' (E2 82 AC), cut off at each byte and broken by a letter."""
    char_of_byte = {b: c for c, b in _gpt2_alphabet().items()}
    token_of_byte = {}
    for b in (0xE2, 0x82, 0xAC):
        fallback = hf.token_to_id(f"<0x{b:02X}>")  # byte-fallback models spell bytes <0xXX>
        token_of_byte[b] = fallback if fallback is not None else hf.token_to_id(char_of_byte[b])
    assert None not in token_of_byte.values(), token_of_byte
    a = [hf.token_to_id("a")]  # the letter alone (sentencepiece-style files would encode "a" as "\u2581a")
    assert a != [None]
    e2, x82, xac = token_of_byte[0xE2], token_of_byte[0x82], token_of_byte[0xAC]
    return {"e2": [e2], "e2_82": [e2, x82], "euro": [e2, x82, xac], "e2_a": [e2] + a,
            "a_e2_82_a": a + [e2, x82] + a, "82_alone": [x82], "euro_twice": [e2, x82, xac, e2, x82, xac]}


def _gpt2_alphabet():
    """character -> byte of the ByteLevel alphabet (GPT-2's bytes_to_unicode)."""
    printable = set(range(33, 127)) | set(range(161, 173)) | set(range(174, 256))
    chars, n = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


def hf_stream(hf, ids, skip):
    """DecodeStream's steps ("" for none), or None where HF refuses to go on: a text that no longer starts with what
    was emitted, which sentencepiece's Strip decoder can produce on arbitrary ids."""
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=skip)
    try:
        return [stream.step(hf, i) or "" for i in ids]
    except Exception as e:
        if "Invalid prefix" not in str(e):
            raise
        return None


def assert_stream_as_hf(got, hf, ids, skip):
    want = hf_stream(hf, ids, skip)
    assert got.get("stream") == want, ids
    if want is None:
        assert "no longer starts with the text already emitted" in got["stream_error"], got


def test_evaluation_text_ids_equal_hf(model_run):
    hf, results = model_run
    case, got = results["evaluation"]
    text = bytes.fromhex(case["hex"]).decode()
    assert len(text) >= 100_000
    want = results["evaluation_decode"][0]["ids"]  # HF's ids of this text, computed once by model_run
    assert len(got["ids"]) == len(want)
    first_diff = next((i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w), None)
    if first_diff is not None:
        window = slice(max(0, first_diff - 3), first_diff + 5)
        pytest.fail(f"ids differ from HF at {first_diff}: {got['ids'][window]} != {want[window]}")
    assert got["decoded"] == text, "decoding the evaluation text must give it back"


def test_evaluation_ids_decode_and_stream_as_hf(model_run):
    hf, results = model_run
    case, got = results["evaluation_decode"]
    assert got["text"] == hf.decode(case["ids"])
    case, got = results["evaluation_stream"]
    assert got["stream"] == hf_stream(hf, case["ids"], True)
    assert "".join(got["stream"]) == hf.decode(case["ids"])


def test_edge_and_special_texts_equal_hf(model_run):
    hf, results = model_run
    checked = 0
    for name, (case, got) in results.items():
        if not name.startswith("text"):
            continue
        text = case["text"]
        want = hf.encode(text, add_special_tokens=case["add_special"]).ids
        assert got.get("ids") == want, (text, got)
        assert got["decoded"] == hf.decode(want), text
        assert got["decoded_all"] == hf.decode(want, skip_special_tokens=False), text
        checked += 1
    assert checked >= 2 * len(EDGE_TEXTS)


def test_special_tokens_in_text_are_matched_first(model_run):
    hf, results = model_run
    specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
    hits = [(case, got) for name, (case, got) in results.items()
            if name.startswith("text") and case["text"] in specials and not case["add_special"]]
    assert hits
    for case, got in hits:
        assert got["ids"] == [specials[case["text"]]]
        assert got["decoded"] == "" and got["decoded_all"] == case["text"]


def test_invalid_utf8_is_rejected_naming_the_byte(model_run):
    """HF cannot be handed invalid UTF-8 (a str is always valid), so there is nothing to copy: encode refuses."""
    _, results = model_run
    for name, (case, got) in results.items():
        if name.startswith("invalid"):
            raw = bytes.fromhex(case["raw"])
            with pytest.raises(UnicodeDecodeError) as bad:
                raw.decode("utf-8")
            assert "not valid UTF-8" in got["error"] and f"(byte {bad.value.start})" in got["error"], got


def test_decode_of_any_ids_equals_hf(model_run):
    hf, results = model_run
    for name, (case, got) in results.items():
        if name.startswith("random") or name == "unknown_ids":
            assert got["text"] == hf.decode(case["ids"], skip_special_tokens=case["skip"]), case["ids"]
            assert_stream_as_hf(got, hf, case["ids"], case["skip"])


def test_incomplete_utf8_pieces_decode_as_hf_and_raw_bytes_stay_exact(model_run):
    hf, results = model_run
    raw = {"e2": b"\xe2", "e2_82": b"\xe2\x82", "euro": "€".encode(), "e2_a": b"\xe2a", "a_e2_82_a": b"a\xe2\x82a",
           "82_alone": b"\x82", "euro_twice": "€€".encode()}
    for name, want in raw.items():
        case, got = results[f"bytes/{name}"]
        assert bytes.fromhex(got["bytes_hex"]) == want, name
        assert got["text"] == hf.decode(case["ids"]), name
        assert got["stream"] == hf_stream(hf, case["ids"], True), name
    assert results["bytes/e2_82"][1]["text"].endswith("\ufffd")
    assert results["bytes/euro"][1]["stream"][-1] == "€"


def test_vocabulary_queries_equal_hf(model_run):
    hf, results = model_run
    case, got = results["vocab"]
    assert got["vocab_size"] == hf.get_vocab_size()
    assert got["ids"] == [hf.token_to_id(t) for t in case["tokens"]]
    assert got["tokens"] == [hf.id_to_token(i) for i in case["of_ids"]]


@pytest.mark.parametrize("style", SENTENCEPIECE_STYLES)
def test_sentencepiece_styles_declare_the_checkpoint_pipelines(sentencepiece_tokenizer, style):
    """The rebuilt files hold the pipelines Llama-2 and Mistral checkpoints declare, so the parity above is theirs."""
    doc = json.loads(Path(sentencepiece_tokenizer(style)).read_text())
    assert [d["type"] for d in doc["decoder"]["decoders"]] == ["Replace", "ByteFallback", "Fuse", "Strip"]
    assert doc["decoder"]["decoders"][3] == {"type": "Strip", "content": " ", "start": 1, "stop": 0}
    assert doc["model"]["type"] == "BPE" and doc["model"]["byte_fallback"] and doc["model"]["fuse_unk"]
    assert doc["post_processor"]["single"][0] == {"SpecialToken": {"id": "<s>", "type_id": 0}}
    if style == "llama2-style":
        assert doc["normalizer"]["normalizers"] == LLAMA2_NORMALIZER["normalizers"] and doc["pre_tokenizer"] is None
    else:
        assert doc["normalizer"] is None
        assert doc["pre_tokenizer"] == {"type": "Metaspace", "replacement": SP, "prepend_scheme": "first",
                                        "split": False}


# ---- files the tokenizer must refuse clearly

def tiny_tokenizer(**override):
    doc = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
           "normalizer": None, "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                                 "trim_offsets": True, "use_regex": True},
           "post_processor": None,
           "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
           "model": {"type": "BPE", "dropout": None, "unk_token": None, "byte_fallback": False,
                     "vocab": {"a": 0, "b": 1, "ab": 2}, "merges": [["a", "b"]]}}
    for key, value in override.items():
        if "." in key:
            outer, inner = key.split(".")
            doc[outer][inner] = value
        else:
            doc[key] = value
    return json.dumps(doc)


BAD_FILES = {
    "not_json": ("{\"model\": [", "not valid JSON"),
    "empty": ("", "not valid JSON"),
    "array": ("[]", " must be an object"),
    "no_model": (json.dumps({"normalizer": None}), "model is missing"),
    "wordpiece": (tiny_tokenizer(**{"model.type": "WordPiece"}), "model.type = WordPiece is not supported"),
    "pre_tokenizer": (tiny_tokenizer(pre_tokenizer={"type": "Whitespace"}),
                      "pre_tokenizer.type = Whitespace is not supported"),
    "nested": (tiny_tokenizer(pre_tokenizer={"type": "Sequence", "pretokenizers": [{"type": "Digits"}]}),
               "pre_tokenizer.pretokenizers[0].type = Digits is not supported"),
    "normalizer": (tiny_tokenizer(normalizer={"type": "NFKC"}), "normalizer.type = NFKC is not supported"),
    "decoder": (tiny_tokenizer(decoder={"type": "WordPiece"}), "decoder.type = WordPiece is not supported"),
    "post_processor": (tiny_tokenizer(post_processor={"type": "RobertaProcessing"}),
                       "post_processor.type = RobertaProcessing is not supported"),
    "split_behavior": (tiny_tokenizer(pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "Odd"}),
                       "pre_tokenizer.behavior = Odd is not supported"),
    "bad_regex": (tiny_tokenizer(pre_tokenizer={"type": "Split", "pattern": {"Regex": "(["}, "behavior": "Isolated"}),
                  "pre_tokenizer.pattern.Regex is not a valid regex"),
    "merge_oov": (tiny_tokenizer(**{"model.merges": [["a", "c"]]}), "model.merges[0] names a token that is not in"),
    "merge_shape": (tiny_tokenizer(**{"model.merges": [["a"]]}), "model.merges[0] must be a pair of tokens"),
    "vocab_type": (tiny_tokenizer(**{"model.vocab": ["a"]}), "model.vocab must be an object"),
    "vocab_id": (tiny_tokenizer(**{"model.vocab": {"a": -1}}), "model.vocab[\"a\"] must be a token id"),
    "sparse_ids": (tiny_tokenizer(**{"model.vocab": {"a": 0, "b": 2**31 - 1}, "model.merges": []}),
                   "model.vocab has id 2147483647, far beyond its 2 entries"),
    "empty_vocab": (tiny_tokenizer(**{"model.vocab": {}, "model.merges": []}), "model.vocab is empty"),
    "unk": (tiny_tokenizer(**{"model.unk_token": "<unk>"}), "model.unk_token = <unk> is not in model.vocab"),
    "dropout": (tiny_tokenizer(**{"model.dropout": 0.1}), "model.dropout = 0.1 is not supported"),
    "lstrip": (tiny_tokenizer(added_tokens=[{"id": 3, "content": "<x>", "lstrip": True}]),
               "added_tokens[0].lstrip = true is not supported"),
    "added_id": (tiny_tokenizer(added_tokens=[{"id": "3", "content": "<x>"}]), "added_tokens[0].id must be a token id"),
    "truncation": (tiny_tokenizer(truncation={"max_length": 8}), "truncation must be null"),
    "template": (tiny_tokenizer(post_processor={
        "type": "TemplateProcessing", "special_tokens": {},
        "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}]}),
                 "post_processor.single[0].SpecialToken.id = <s> is not in post_processor.special_tokens"),
    "metaspace_scheme": (tiny_tokenizer(pre_tokenizer={"type": "Metaspace", "replacement": SP,
                                                       "prepend_scheme": "sometimes"}),
                         "pre_tokenizer.prepend_scheme = sometimes is not supported"),
    "metaspace_replacement": (tiny_tokenizer(pre_tokenizer={"type": "Metaspace", "replacement": "ab"}),
                              "pre_tokenizer.replacement must be a single character"),
    "metaspace_prefix_space": (tiny_tokenizer(pre_tokenizer={"type": "Metaspace", "replacement": SP,
                                                             "add_prefix_space": False}),
                               "pre_tokenizer.add_prefix_space = false contradicts prepend_scheme"),
    "metaspace_decoder": (tiny_tokenizer(decoder={"type": "Metaspace", "replacement": SP, "prepend_scheme": "last"}),
                          "decoder.prepend_scheme = last is not supported"),
    "strip_count": (tiny_tokenizer(decoder={"type": "Sequence", "decoders": [
        {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": -1, "stop": 0}]}),
                    "decoder.decoders[1].start must be a non-negative integer"),
    "strip_content": (tiny_tokenizer(decoder={"type": "Strip", "content": "  ", "start": 1, "stop": 0}),
                      "decoder.content must be a single character"),
    "prepend_missing": (tiny_tokenizer(normalizer={"type": "Sequence", "normalizers": [{"type": "Prepend"}]}),
                        "normalizer.normalizers[0].prepend is missing"),
}
# Files HF itself refuses to load: the C++ tokenizer refuses them too, rather than guess.
HF_REFUSES = ["metaspace_scheme", "metaspace_replacement", "metaspace_prefix_space", "metaspace_decoder",
              "strip_count", "strip_content", "prepend_missing"]


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_bad_tokenizer_file_is_refused_by_name(driver, tmp_path, name):
    content, message = BAD_FILES[name]
    path = tmp_path / "tokenizer.json"
    path.write_text(content)
    text = tmp_path / "text.txt"
    text.write_text("ab ab")
    r = run_driver(driver, path, "ids", text)
    err = r.stderr.decode()
    assert r.returncode == 2, (r.returncode, err)  # an error exit, not a signal
    assert err.startswith(f"error: {path}: ") and message in err, err


@pytest.mark.parametrize("name", HF_REFUSES)
def test_files_hf_refuses_are_refused(name):
    import tokenizers

    with pytest.raises(Exception):
        tokenizers.Tokenizer.from_str(BAD_FILES[name][0])


def test_missing_tokenizer_file_is_refused(driver, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("ab")
    r = run_driver(driver, tmp_path / "nope.json", "ids", text)
    assert r.returncode == 2 and f"{tmp_path / 'nope.json'}: cannot open the tokenizer file" in r.stderr.decode()


def test_tiny_tokenizer_works(driver, tmp_path):
    """The fixture the bad files are cut from is itself valid, and merges as HF does."""
    import tokenizers

    path = tmp_path / "tokenizer.json"
    path.write_text(tiny_tokenizer())
    text = tmp_path / "text.txt"
    text.write_text("abab ba")
    r = run_driver(driver, path, "ids", text)
    assert r.returncode == 0, r.stderr.decode()
    ids = [int(i) for i in r.stdout.decode().splitlines()[0].split()]
    assert ids == tokenizers.Tokenizer.from_file(str(path)).encode("abab ba").ids == [2, 2, 1, 0]


# ---- the generic pieces, on tokenizers HF itself builds (trained on a little text, so fast)

def _synthetic(config):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers import trainers

    bpe = dict(unk_token="[UNK]", fuse_unk=config.get("fuse_unk", False),
               byte_fallback=config.get("byte_fallback", False))
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if key in config:
            bpe[key] = config[key]
    tok = Tokenizer(models.BPE(**bpe))
    if config.get("norm"):
        tok.normalizer = normalizers.Sequence([normalizers.Replace("a", "A"), normalizers.Replace(Regex(r"\s+"), " ")])
    pre = config.get("pre", "split")
    if pre == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
    else:
        behavior, invert = config.get("behavior", "isolated"), config.get("invert", False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(" ", "merged_with_next"),
            pre_tokenizers.Split(Regex(r"\d|[.,;:!?]+"), behavior, invert=invert)])
        tok.decoder = config.get("decoder", decoders.Sequence([decoders.Replace("_", " "), decoders.ByteFallback(),
                                                               decoders.Fuse()]))
    alphabet = pre_tokenizers.ByteLevel.alphabet() if pre == "bytelevel" else []
    extra = [f"<0x{b:02X}>" for b in range(256)] if config.get("byte_fallback") else []
    options = {k: config[k] for k in ("continuing_subword_prefix", "end_of_word_suffix") if k in config}
    if not alphabet:
        options["limit_alphabet"] = 40  # leaves rare characters to [UNK] or the byte fallback
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["[UNK]", "[CLS]", "[SEP]"] + extra,
                                  initial_alphabet=alphabet, show_progress=False, **options)
    from tda_export.text import corpus

    tok.train_from_iterator([corpus("calibration")[:40_000]], trainer)
    tok.add_tokens([AddedToken("hello world", normalized=True), AddedToken("<raw>", normalized=False),
                    AddedToken("ALL", normalized=True)])
    tok.add_special_tokens([AddedToken("<|end|>", normalized=False)])
    if config.get("template"):
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP] [SEP]",
                                                           special_tokens=[("[CLS]", 1), ("[SEP]", 2)])
    if "ignore_merges" in config:
        tok.model.ignore_merges = config["ignore_merges"]
    return tok


SYNTHETIC = {
    "isolated": {}, "removed": {"behavior": "removed"}, "previous": {"behavior": "merged_with_previous"},
    "next": {"behavior": "merged_with_next"}, "contiguous": {"behavior": "contiguous", "invert": True},
    "normalized_added": {"norm": "replace", "template": True}, "unk_fused": {"fuse_unk": True},
    "byte_fallback": {"byte_fallback": True},
    "affixes": {"continuing_subword_prefix": "##", "end_of_word_suffix": "</w>"},
    "bytelevel_prefix_space": {"pre": "bytelevel", "ignore_merges": True}, "no_decoder": {"decoder": None},
}


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_generic_pieces_equal_hf(driver, tmp_path, name):
    from tda_export.text import corpus

    hf = _synthetic(SYNTHETIC[name])
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    texts = [corpus("evaluation")[:20_000], "hello world and hello  world, <raw> ALL all <|end|>x",
             "Ünïcödé 日本 🤗 unseen ẞ chars ₤", "1,2;3... 4!? 56", "a_b __ c"] + EDGE_TEXTS[:20]
    cases = [{"hex": t.encode().hex(), "add_special": add} for t in texts for add in (True, False)]
    answers = run_cases(driver, path, cases, tmp_path)
    for case, got in zip(cases, answers):
        text = bytes.fromhex(case["hex"]).decode()
        want = hf.encode(text, add_special_tokens=case["add_special"]).ids
        assert got.get("ids") == want, (text[:200], got)
        assert got["decoded"] == hf.decode(want), text[:200]
        assert got["decoded_all"] == hf.decode(want, skip_special_tokens=False), text[:200]


# ---- Metaspace, Prepend and Strip beyond the two checkpoint styles: every prepend scheme, split or not, the older
# add_prefix_space/str_rep fields, Metaspace after a Split, normalized added tokens under Prepend, the Metaspace decoder

def _metaspace_decoder(scheme):
    return {"type": "Sequence", "decoders": [{"type": "Metaspace", "replacement": SP, "prepend_scheme": scheme},
                                             {"type": "ByteFallback"}, {"type": "Fuse"}]}


def _metaspace(scheme, split):
    return {"type": "Metaspace", "replacement": SP, "prepend_scheme": scheme, "split": split}


LLAMA2_NORMALIZER = {"type": "Sequence", "normalizers": [
    {"type": "Prepend", "prepend": SP}, {"type": "Replace", "pattern": {"String": " "}, "content": SP}]}
METASPACE_VARIANTS = {
    "always_split": {"pre_tokenizer": _metaspace("always", True), "decoder": _metaspace_decoder("always")},
    "never_split": {"pre_tokenizer": _metaspace("never", True), "decoder": _metaspace_decoder("never")},
    "first_split": {"pre_tokenizer": _metaspace("first", True), "decoder": _metaspace_decoder("first")},
    "always_whole": {"pre_tokenizer": _metaspace("always", False), "decoder": _metaspace_decoder("always")},
    # Oniguruma (HF) anchors ^ and $ at each line, not only at the text's ends
    "line_anchors": {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": "^(?=.)"}, "content": "["},
        {"type": "Replace", "pattern": {"Regex": "$"}, "content": "]"},
        {"type": "Replace", "pattern": {"Regex": "\\Z"}, "content": "|"}]},
        "pre_tokenizer": _metaspace("always", True), "decoder": _metaspace_decoder("always")},
    # a normalizer that deletes the first character moves the text's start: "first" then prepends nothing
    "first_after_deletion": {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": "^\\s+"}, "content": ""},
        {"type": "Replace", "pattern": {"String": "T"}, "content": ""},
        {"type": "Replace", "pattern": {"String": "W"}, "content": "VV"}]},
        "pre_tokenizer": _metaspace("first", False), "decoder": _metaspace_decoder("first")},
    "older_fields": {"pre_tokenizer": {"type": "Metaspace", "replacement": SP, "str_rep": SP, "add_prefix_space": True},
                     "decoder": {"type": "Metaspace", "replacement": SP, "str_rep": SP, "add_prefix_space": True}},
    "after_split": {"pre_tokenizer": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\d| {2,}"}, "behavior": "Removed", "invert": False},
        _metaspace("first", True)]}, "decoder": _metaspace_decoder("first")},
    "prepend_added": {"normalizer": LLAMA2_NORMALIZER, "pre_tokenizer": None, "added": True,
                      "decoder": {"type": "Sequence", "decoders": [
                          {"type": "Replace", "pattern": {"String": SP}, "content": " "}, {"type": "ByteFallback"},
                          {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 2, "stop": 0}]}},
    # Llama-2 files are also seen with normalized <unk>/<s>/</s>: matched only after "\u2581", and (tokenizers 0.23)
    # kept by skip_special_tokens since their normalized form is no special content
    "llama2_normalized_specials": {"normalizer": LLAMA2_NORMALIZER, "pre_tokenizer": None, "normalized_specials": True,
                                   "decoder": {"type": "Sequence", "decoders": [
                                       {"type": "Replace", "pattern": {"String": SP}, "content": " "},
                                       {"type": "ByteFallback"}, {"type": "Fuse"},
                                       {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}},
    # HF's Strip panics where its two cuts cross (an empty or all-space text with stop > 0): texts without those
    "strip_both_ends": {"normalizer": LLAMA2_NORMALIZER, "pre_tokenizer": None, "plain_texts_only": True,
                        "decoder": {"type": "Sequence", "decoders": [
                            {"type": "Replace", "pattern": {"String": SP}, "content": " "}, {"type": "ByteFallback"},
                            {"type": "Fuse"}, {"type": "Strip", "content": " ", "start": 3, "stop": 2}]}},
}


@pytest.mark.parametrize("name", list(METASPACE_VARIANTS))
def test_metaspace_variants_equal_hf(driver, tmp_path, name):
    import tokenizers
    from tokenizers import AddedToken

    from tda_export.text import corpus

    doc = json.loads(_sentencepiece_bpe())
    variant = dict(METASPACE_VARIANTS[name])
    with_added = variant.pop("added", False)
    plain_texts_only = variant.pop("plain_texts_only", False)
    if variant.pop("normalized_specials", False):
        for token in doc["added_tokens"]:
            token["normalized"] = True
    doc.update(variant)
    hf = tokenizers.Tokenizer.from_str(json.dumps(doc))
    if with_added:  # normalized ones are matched after the normalizer, so Prepend decides where they can match
        hf.add_tokens([AddedToken("hello world", normalized=True), AddedToken(f"{SP}thee", normalized=True),
                       AddedToken("<raw>", normalized=False)])
        hf.add_special_tokens([AddedToken("<sp>", normalized=True, special=True)])  # kept by skip_special, as HF
    path = tmp_path / "tokenizer.json"
    hf.save(str(path))
    texts = [corpus("evaluation")[:20_000], "hello world and hello  world, thee <raw> thee<raw>thee <sp> x<sp>",
             " one leading", "  two leading", "<s>after the bos", "The cat", "TTThe", "What", " The", "x<s> y </s>", "12 ab  34cd 5", "9", " 9 x",
             "a\u2581b \u2581\u2581c", "\u2581"] + EDGE_TEXTS[:30]
    if plain_texts_only:
        texts = [corpus("evaluation")[:20_000], "   three leading, two trailing  ", "x  y   z    "]
    cases = [{"hex": t.encode().hex(), "add_special": add} for t in texts for add in (True, False)]
    rng = random.Random(1)
    decodes = [[rng.randrange(hf.get_vocab_size()) for _ in range(rng.randint(1, 40))] for _ in range(20)]
    if plain_texts_only:
        decodes = []
    cases += [{"ids": ids, "skip": skip} for ids in decodes for skip in (True, False)]
    added_ids = sorted(hf.get_added_tokens_decoder())
    cases.append({"tokens": [t.content for t in hf.get_added_tokens_decoder().values()], "of_ids": added_ids})
    answers = run_cases(driver, path, cases, tmp_path)
    for case, got in zip(cases, answers):
        if "tokens" in case:  # since tokenizers 0.23 id_to_token gives a normalized token's normalized form
            assert got["ids"] == [hf.token_to_id(t) for t in case["tokens"]]
            assert got["tokens"] == [hf.id_to_token(i) for i in case["of_ids"]]
        elif "hex" in case:
            text = bytes.fromhex(case["hex"]).decode()
            want = hf.encode(text, add_special_tokens=case["add_special"]).ids
            assert got.get("ids") == want, (text[:200], got)
            assert got["decoded"] == hf.decode(want), text[:200]
            assert got["decoded_all"] == hf.decode(want, skip_special_tokens=False), text[:200]
        else:
            assert got["text"] == hf.decode(case["ids"], skip_special_tokens=case["skip"]), case["ids"]
            assert_stream_as_hf(got, hf, case["ids"], case["skip"])


# ---- through tda-run: the runtime tokenizes text prompts and detokenizes its output with this library

def _tiny_sentencepiece_tokenizer(style, vocab_size):
    """A transformers tokenizer of `style` (llama2-style or transformers-llama) with `vocab_size` tokens."""
    from transformers import PreTrainedTokenizerFast

    tok = _train_sentencepiece_bpe(vocab_size=vocab_size, limit_alphabet=40, chars=100_000)
    if style == "transformers-llama":
        return _transformers_llama(json.loads(tok.to_str()))
    return PreTrainedTokenizerFast(tokenizer_object=_as_style(tok, style), unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")


@pytest.mark.parametrize("style", ["llama2-style", "transformers-llama"])
def test_tda_run_text_equals_python_runtime_on_a_sentencepiece_engine(tmp_path, style):
    """A tiny Llama engine carrying a Llama-2- or Mistral-style tokenizer.json: tda-run's streamed text equals the
    ONNX Runtime backend's generation loop (which tokenizes with transformers) for text prompts."""
    from tda_export.native import build_native
    from tda_export.runtime.engine import Engine
    from tda_export.runtime.generate import generate
    from tda_export.runtime.sampling import SamplingParams
    from test_runtime import build_engine
    from tiny_models import COMMON, tiny_model

    if not shutil.which("cmake") or not _compiler():
        pytest.skip("cmake and a C++ compiler are needed to build tda-run")
    native = build_native()
    model_dir = tmp_path / "model"
    tiny_model("llama").save_pretrained(model_dir, safe_serialization=True)
    _tiny_sentencepiece_tokenizer(style, COMMON["vocab_size"]).save_pretrained(model_dir)
    out, _ = build_engine(model_dir, tmp_path / "engine", tmp_path)
    doc = json.loads((out / "tokenizer.json").read_text())
    if style == "llama2-style":  # the engine kept the legacy pipeline
        assert [n["type"] for n in doc["normalizer"]["normalizers"]] == ["Prepend", "Replace"], doc["normalizer"]
    else:
        assert doc["pre_tokenizer"]["type"] == "Metaspace" and doc["pre_tokenizer"]["prepend_scheme"] == "first"
    ort = Engine.load(out, backend="onnxruntime")
    params = SamplingParams(max_new_tokens=10)
    for prompt in ("The capital of France is", "  two leading spaces,  inner  runs ", "caf\u00e9 \u65e5\u672c"):
        want = generate(ort, [prompt], params, 0.5)
        r = subprocess.run([str(native.cli), "-e", str(out), "-p", prompt, "-n", "10", "-d", "0.5"],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stdout == want[0], (prompt, r.stdout, want)
