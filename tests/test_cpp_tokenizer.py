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
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "cpp" / "tokenizer"
MODELS = ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)]


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


@pytest.fixture(scope="module", params=MODELS)
def model_run(request, driver, saved_tokenizer, tmp_path_factory):
    """All cases of one real tokenizer: (hf tokenizer, {name: (case, answer)})."""
    import tokenizers

    from tda_export.text import corpus

    path = saved_tokenizer(request.param)
    hf = tokenizers.Tokenizer.from_file(str(path))
    evaluation = corpus("evaluation")
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
    cases["vocab"] = {"tokens": probe}
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
    a = hf.encode("a", add_special_tokens=False).ids
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
    from tokenizers.decoders import DecodeStream

    stream = DecodeStream(skip_special_tokens=skip)
    return [stream.step(hf, i) or "" for i in ids]


def test_evaluation_text_ids_equal_hf(model_run):
    hf, results = model_run
    case, got = results["evaluation"]
    text = bytes.fromhex(case["hex"]).decode()
    assert len(text) >= 100_000
    want = hf.encode(text, add_special_tokens=False).ids
    assert len(got["ids"]) == len(want)
    first_diff = next((i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w), None)
    assert first_diff is None, (first_diff, got["ids"][first_diff - 3:first_diff + 5], want[first_diff - 3:first_diff + 5])
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
            assert got["stream"] == hf_stream(hf, case["ids"], case["skip"]), case["ids"]


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
    "unk": (tiny_tokenizer(**{"model.unk_token": "<unk>"}), "model.unk_token = <unk> is not in model.vocab"),
    "dropout": (tiny_tokenizer(**{"model.dropout": 0.1}), "model.dropout = 0.1 is not supported"),
    "lstrip": (tiny_tokenizer(added_tokens=[{"id": 3, "content": "<x>", "lstrip": True}]),
               "added_tokens[0].lstrip = true is not supported"),
    "added_id": (tiny_tokenizer(added_tokens=[{"id": "3", "content": "<x>"}]), "added_tokens[0].id must be a token id"),
    "truncation": (tiny_tokenizer(truncation={"max_length": 8}), "truncation must be null"),
    "template": (tiny_tokenizer(post_processor={"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<s>"}}, {"Sequence": {"id": "A"}}], "special_tokens": {}}),
                 "post_processor.single[0].SpecialToken.id = <s> is not in post_processor.special_tokens"),
}


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

    bpe = dict(unk_token="[UNK]", fuse_unk=config.get("fuse_unk", False), byte_fallback=config.get("byte_fallback", False))
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if key in config:
            bpe[key] = config[key]
    tok = Tokenizer(models.BPE(**bpe))
    tok.normalizer = {"none": None,
                      "replace": normalizers.Sequence([normalizers.Replace("a", "A"),
                                                       normalizers.Replace(Regex(r"\s+"), " ")])}[config.get("norm", "none")]
    pre = config.get("pre", "split")
    if pre == "bytelevel":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
    else:
        behavior, invert = config.get("behavior", "isolated"), config.get("invert", False)
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(" ", "merged_with_next"),
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
    "byte_fallback": {"byte_fallback": True}, "affixes": {"continuing_subword_prefix": "##", "end_of_word_suffix": "</w>"},
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
