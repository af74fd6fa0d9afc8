"""The TensorRT plugins' decisions (plugins/tda_plugin_logic.h), checked without TensorRT or a GPU.

tests/plugin_logic_main.cpp is compiled with g++ and answers one stdin command per line; the
plugin sources are also parsed as text so their names and enum tables cannot drift from
tda_export/ops/contract.py. The TensorRT adapters themselves are only compile-checked
(plugins/README.md).
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tda_export.ops import contract
from tda_export.ops.contract import ACTIVATIONS, DTYPES, PLUGIN_FIELDS, SCORE_NORMS, SELECT_ACTIVE, SPARSE_GATED_MLP

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = ROOT / "plugins"
LOGIC = PLUGINS / "tda_plugin_logic.h"
ABI_HEADER = ROOT / "cuda" / "include" / "tda_kernels.h"

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    exe = tmp_path_factory.mktemp("plugin_logic") / "plugin_logic"
    subprocess.run(["g++", "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", f"-I{PLUGINS}",
                    f"-I{ROOT / 'cuda' / 'include'}", f"-I{ROOT / 'cuda' / 'src'}",
                    str(ROOT / "tests" / "plugin_logic_main.cpp"), "-o", str(exe)], check=True)

    def ask(*commands: str, decode_version_env: str | None = None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "TDA_DECODE_VERSION"}
        if decode_version_env is not None:
            env["TDA_DECODE_VERSION"] = decode_version_env
        out = subprocess.run([str(exe)], input="\n".join(commands) + "\n", capture_output=True, text=True, check=True,
                             env=env)
        answers = out.stdout.splitlines()
        assert len(answers) == len(commands)
        return answers

    return ask


# ---- names and tables, from the source text ----

def _abi_enum_values() -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(TDA_\w+)\s*=\s*(\d+)", ABI_HEADER.read_text())}


def _table(name: str) -> list[tuple[str, str]]:
    body = re.search(name + r"\[\]\s*=\s*\{(.*?)\};", LOGIC.read_text(), re.S).group(1)
    return re.findall(r'\{"(\w+)",\s*(TDA_\w+)\}', body)


def _strings(name: str) -> list[str]:
    body = re.search(name + r"\[\]\s*=\s*\{(.*?)\};", LOGIC.read_text(), re.S).group(1)
    return re.findall(r'"(\w+)"', body)


def _const(name: str) -> str:
    return re.search(name + r'\s*=\s*"(\w+)"', LOGIC.read_text()).group(1)


def test_plugin_identity_matches_contract():
    assert _const("kNamespace") == contract.PLUGIN_NAMESPACE
    assert _const("kVersion") == contract.PLUGIN_VERSION
    assert _const("kSparseGatedMlpName") == SPARSE_GATED_MLP.name
    assert _const("kSelectActiveName") == SELECT_ACTIVE.name


def test_plugin_fields_match_contract():
    assert tuple(_strings("kSparseGatedMlpFields")) == PLUGIN_FIELDS["SparseGatedMLP"]
    assert int(re.search(r"kSparseGatedMlpNbFields = (\d+)", LOGIC.read_text()).group(1)) == \
        len(PLUGIN_FIELDS["SparseGatedMLP"])
    assert PLUGIN_FIELDS["SelectActive"] == ()  # the SelectActive creator advertises an empty collection
    # The adapters take field names from the logic header only: no field name spelled out elsewhere.
    for src in PLUGINS.glob("*.cpp"):
        for field in PLUGIN_FIELDS["SparseGatedMLP"]:
            assert f'"{field}"' not in src.read_text(), (src.name, field)


def test_io_names_match_contract():
    assert _strings("kNames")[:9] == SPARSE_GATED_MLP.input_names + SPARSE_GATED_MLP.output_names
    sel = re.search(r"namespace sel \{(.*?)\}  // namespace sel", LOGIC.read_text(), re.S).group(1)
    assert re.findall(r'"(\w+)"', sel) == SELECT_ACTIVE.input_names + SELECT_ACTIVE.output_names


def test_enum_tables_match_contract_order():
    values = _abi_enum_values()
    assert [n for n, _ in _table("kActivations")] == list(ACTIVATIONS)
    assert [values[e] for _, e in _table("kActivations")] == list(range(len(ACTIVATIONS)))
    assert [n for n, _ in _table("kScoreNorms")] == list(SCORE_NORMS)
    assert [values[e] for _, e in _table("kScoreNorms")] == list(range(len(SCORE_NORMS)))
    assert re.findall(r'\{"(\w+)", (\d+)\}', re.search(r"kDecodeVersions\[\]\s*=\s*\{(.*?)\};", LOGIC.read_text(),
                                                         re.S).group(1)) == [(v, v) for v in contract.DECODE_VERSIONS]
    assert [n for n, _ in _table("kDtypes")] == list(DTYPES)
    assert [values[e] for _, e in _table("kDtypes")] == list(range(len(DTYPES)))
    assert [n for n, _ in _table("kWeightFormats")] == list(contract.WEIGHT_FORMATS)
    assert [values[e] for _, e in _table("kWeightFormats")] == list(range(len(contract.WEIGHT_FORMATS)))
    # down_weight_format: "same" = 0, else the block format's own tda_weight_format_t (the ABI's field).
    assert [n for n, _ in _table("kDownWeightFormats")] == list(contract.DOWN_WEIGHT_FORMATS)
    assert [values[e] for _, e in _table("kDownWeightFormats")] == list(range(len(contract.DOWN_WEIGHT_FORMATS)))
    assert [n for n, _ in _table("kXFormats")] == list(contract.X_FORMATS)
    assert [values[e] for _, e in _table("kXFormats")] == list(range(len(contract.X_FORMATS)))


def test_compiled_tables_match_contract_order(run):
    (line,) = run("names")
    pairs = dict(tok.split("=") for tok in line.split()[1:])
    expect = {f"activation:{a}": str(i) for i, a in enumerate(ACTIVATIONS)}
    expect |= {f"score_norm:{n}": str(i) for i, n in enumerate(SCORE_NORMS)}
    expect |= {f"dtype:{d}": str(i) for i, d in enumerate(DTYPES)}
    expect |= {f"down_weight_format:{d}": str(i) for i, d in enumerate(contract.DOWN_WEIGHT_FORMATS)}
    expect |= {f"x_format:{x}": str(i) for i, x in enumerate(contract.X_FORMATS)}
    assert pairs == expect


# ---- field parsing ----

def _ok(act: int, norm: int, version: int = 1) -> str:
    """The answer of a parse: codes, then the values the plugin serializes."""
    return f"ok {act} {norm} {version} {ACTIVATIONS[act]},{SCORE_NORMS[norm]},dtype,same,dtype,{version}"


def test_every_contract_value_parses(run):
    cmds = [f"mlp_fields activation={a} score_norm={n}" for a in ACTIVATIONS for n in SCORE_NORMS]
    expect = [_ok(i, j) for i in range(len(ACTIVATIONS)) for j in range(len(SCORE_NORMS))]
    assert run(*cmds) == expect
    assert run(*[f"plan_fields decode_version={v}" for v in contract.DECODE_VERSIONS]) == \
        [_ok(0, 0, int(v)) for v in contract.DECODE_VERSIONS]


def test_decode_version_fixed_when_building_and_kept_by_the_plan(run):
    # An ONNX node has no decode_version: the build takes the building process's default, once.
    assert run("mlp_fields", decode_version_env="2") == [_ok(0, 0, 2)]
    assert run("mlp_fields", decode_version_env="3") == [_ok(0, 0, 1)]
    # A plan keeps what it recorded whatever the running process says; one without the field was sized for 1.
    assert run("plan_fields decode_version=1", "plan_fields", decode_version_env="2") == [_ok(0, 0, 1)] * 2
    assert run("plan_fields decode_version=2") == [_ok(0, 0, 2)]
    (bad,) = run("plan_fields decode_version=0")
    assert bad.startswith("error") and "decode_version '0' not in 1, 2" in bad


def test_field_defaults_nul_and_metadata(run):
    defaults = (ACTIVATIONS.index(SPARSE_GATED_MLP.attr("activation").default),
                SCORE_NORMS.index(SPARSE_GATED_MLP.attr("score_norm").default))
    assert run("mlp_fields", "mlp_fields activation:nul=gelu score_norm:nul=none weight_format=dtype",
               "mlp_fields plugin_namespace=tda plugin_version=1", "select_fields",
               "select_fields plugin_namespace=tda") == \
        [_ok(*defaults), _ok(2, 1), _ok(*defaults), "ok", "ok"]


@pytest.mark.parametrize("fields, message", [
    ("activation=swish", "activation 'swish' not in silu, gelu_tanh, gelu, relu"),
    ("activation=SILU", "activation 'SILU' not in"),
    ("score_norm=l2", "score_norm 'l2' not in token_l2, none"),
    ("activation:int=silu", "must be a char (string) field"),
    ("activaton=silu", "unknown field activaton"),
    ("weight_format=q5_k", "weight_format 'q5_k' not in dtype, q8_0, q4_0, q4_1"),
    ("weight_format=q4_1 down_weight_format=dtype", "down_weight_format 'dtype' not in same, q8_0, q4_0, q4_1"),
    ("down_weight_format=q8_0", "down_weight_format 'q8_0' needs a block weight_format, not 'dtype'"),
    ("down_weight_format=q8_0 weight_format=dtype", "down_weight_format 'q8_0' needs a block weight_format"),
    ("weight_format=q4_0 x_format=q4_0", "x_format 'q4_0' not in dtype, q8_0"),
    ("weight_format=q8_0 x_format=Q8_0", "x_format 'Q8_0' not in dtype, q8_0"),
    ("x_format=q8_0", "x_format 'q8_0' needs a block weight_format, not 'dtype'"),
    ("x_format=q8_0 weight_format=dtype down_weight_format=same", "x_format 'q8_0' needs a block weight_format"),
    ("weight_format=q4_1 x_format:int=q8_0", "field x_format must be a char (string) field"),
])
def test_bad_fields_rejected(run, fields, message):
    (answer,) = run(f"mlp_fields {fields}")
    assert answer.startswith("error") and message in answer


def test_select_rejects_fields(run):
    assert run("select_fields activation=silu") == ["error SelectActive: unknown field activation"]


# ---- shapes ----

def _mlp(B=2, S=5, H=16, I=24, **override):
    shapes = {"hidden_states": f"{B},{S},{H}", "gate_up_weight": f"{I},2,{H}", "down_weight_t": f"{I},{H}",
              "active_idx": f"{B},{I}", "active_count": f"{B}", "token_valid": f"{B},{S}", "scores_in": f"{B},{I}"}
    shapes.update(override)
    return "mlp_shapes " + " ".join(shapes[n] for n in SPARSE_GATED_MLP.input_names)


def test_shapes_ok_and_wildcards(run):
    assert run(_mlp(), _mlp(S=1), _mlp(B=130), _mlp(B="?", S="?")) == \
        ["ok 2 5 16 24", "ok 2 1 16 24", "ok 130 5 16 24", "ok -1 -1 16 24"]


@pytest.mark.parametrize("cmd, message", [
    (_mlp(hidden_states="2,16"), "hidden_states: rank 2, expected 3"),
    (_mlp(active_count="2,1"), "active_count: rank 2, expected 1"),
    (_mlp(H=12), "H (hidden size) = 12 must be a positive multiple of 8"),
    (_mlp(I=20), "I (intermediate size) = 20 must be a positive multiple of 8"),
    (_mlp(H=0), "H (hidden size) = 0 must be a positive multiple of 8"),
    (_mlp(gate_up_weight="24,3,16"), "gate_up_weight: dimension 1 must be 2"),
    (_mlp(active_idx="3,24"), "active_idx: B = 3 but 2 elsewhere"),
    (_mlp(token_valid="2,4"), "token_valid: S = 4 but 5 elsewhere"),
    (_mlp(down_weight_t="24,32"), "down_weight_t: H = 32 but 16 elsewhere"),
    (_mlp(scores_in="2,32"), "scores_in: I = 32 but 24 elsewhere"),
    ("mlp_shapes 2,5,16 24,2,16", "expected 7 inputs, got 2"),
])
def test_bad_shapes_rejected(run, cmd, message):
    (answer,) = run(cmd)
    assert answer == f"error {message}"


# ---- TensorRT-style profiles: each input has its own bounds ----
# Regression (issue 8): the exported graph derives token_valid from attention_mask, whose max S
# (past + new tokens) exceeds hidden_states' max S; TensorRT-RTX then called configurePlugin with
# desc.max S = 191 for token_valid and 64 for hidden_states, and the plugin rejected a valid profile.

def _profile(B=2, S=64, S_valid=191, B_idx=None, H=16, I=24):
    B_idx = B if B_idx is None else B_idx
    return [f"{B},{S},{H}", f"{I},2,{H}", f"{I},{H}", f"{B_idx},{I}", f"{B_idx}", f"{B},{S_valid}", f"{B_idx},{I}"]


def test_configure_accepts_wildcard_dims_of_a_derived_tensor(run):
    # desc.dims at configure time: -1 wherever the profile leaves a dimension free.
    assert run(_mlp(B="?", S="?", token_valid="?,?"), _mlp(B="?", S="?", token_valid="?,191")) == \
        ["ok -1 -1 16 24", "ok -1 191 16 24"]


def test_profile_bounds_need_not_agree(run):
    # The profile: hidden_states S <= 64, token_valid S <= 191. A runtime S is the same in
    # both, so it is <= 64: the workspace covers B=2, S=64.
    prefill_ws = int(run("prefill_layout f16 2 64 16 24")[0].split()[-1])
    assert run("mlp_profile f16 1 " + " ".join(_profile())) == [f"ok 2 64 16 24 ws {prefill_ws}"]
    # Same for B, whichever input carries the tighter bound.
    assert run("mlp_profile f16 1 " + " ".join(_profile(B=8, B_idx=2, S_valid=64))) == [f"ok 2 64 16 24 ws {prefill_ws}"]
    assert run("mlp_profile f16 1 " + " ".join(_profile(B=2, B_idx=8, S_valid=64))) == [f"ok 2 64 16 24 ws {prefill_ws}"]
    # A decode profile: hidden_states S is 1, token_valid spans the past. Only the decode
    # workspace is reserved, not a prefill over the past's length.
    decode_only = run("mlp_ws f16 4 1 16 24 1")[0]
    assert run("mlp_profile f16 1 " + " ".join(_profile(B=4, S=1, S_valid=200))) == [f"ok 4 1 16 24 ws {decode_only}"]
    # A prefill profile whose min S is 2 reserves no decode workspace.
    assert run("mlp_profile f16 2 " + " ".join(_profile())) == [f"ok 2 64 16 24 ws {prefill_ws}"]


def test_profile_still_checks_weights(run):
    bad = _profile()
    bad[1] = "24,3,16"
    assert run("mlp_profile f16 1 " + " ".join(bad)) == ["error gate_up_weight: dimension 1 must be 2"]
    bad = _profile(H=12)
    assert run("mlp_profile f16 1 " + " ".join(bad)) == ["error H (hidden size) = 12 must be a positive multiple of 8"]
    assert run("mlp_profile f16 1 " + " ".join(_profile()[:6])) == ["error expected 7 inputs, got 6"]


def test_select_shapes(run):
    assert run("select_shapes 2,24 - 2", "select_shapes 130,0 - 2", "select_shapes 2,24 1 2", "select_shapes 24 - 2",
               "select_shapes 2,24 - 3", "select_shapes 2,24 - -1", "select_shapes 2,24 -") == \
        ["ok 2 24", "ok 130 0", "error threshold: rank 1, expected 0", "error scores: rank 1, expected 2",
         "error density_bounds: must have 2 entries (lo, hi)", "ok 2 24", "error expected 3 inputs, got 2"]


def test_output_shapes_follow_inputs(run):
    # output = hidden_states dims (B, S, H); scores_out = scores_in dims; select: scores dims and scores dim 0.
    assert run("out_shapes") == ["ok mlp 0.0 0.1 0.2 | 6.0 6.1 select 0.0 0.1 | 0.0"]


def test_mode_from_runtime_seq(run):
    assert run("mode 1", "mode 2", "mode 512", "mode 0") == ["decode", "prefill", "prefill", "prefill"]


# ---- types and formats ----

def test_output_types(run):
    fixed = "i32 i32 f32 f32"
    assert run(*(f"mlp_types {t} {t} {t} {fixed}" for t in ("f32", "f16", "bf16"))) == \
        ["ok f32 f32", "ok f16 f32", "ok bf16 f32"]
    assert run(f"mlp_types i32 i32 i32 {fixed}", f"mlp_types other other other {fixed}") == \
        ["error hidden_states: T must be float32, float16 or bfloat16"] * 2
    assert run("select_types f32 f32 f32", "select_types f16 f32 f32", "select_types f32 f32") == \
        ["ok i32 i32", "error scores: must be float32", "error expected 3 inputs"]


@pytest.mark.parametrize("io, ok", [
    ("f16", True), ("bf16", True), ("f32", True), ("i32", False), ("other", False), ("f16!", False),
    ("bf16 bf16", True), ("bf16 f16", False), ("f16 f16 f16", True), ("f16 f16 f32", False),
    ("f16 f16 f16 i32", True), ("f16 f16 f16 f32", False), ("f16 f16 f16 i32 i32", True),
    ("f16 f16 f16 i32 i32 f32", True), ("f16 f16 f16 i32 i32 f16", False),
    ("f16 f16 f16 i32 i32 f32 f32", True), ("f16 f16 f16 i32 i32 f32 f32 f16", True),
    ("f16 f16 f16 i32 i32 f32 f32 f32", False), ("f16 f16 f16 i32 i32 f32 f32 f16 f32", True),
    ("f16 f16 f16 i32 i32 f32 f32 f16 f16", False), ("f16 f16 f16 i32 i32 f32 f32 f16 f32!", False),
])
def test_mlp_format_support(run, io, ok):
    assert run(f"mlp_supports {io}") == ["yes" if ok else "no"]


@pytest.mark.parametrize("io, ok", [
    ("f32", True), ("f16", False), ("f32 f32", True), ("f32 i32", False), ("f32 f32 f32", True),
    ("f32 f32 i32", False), ("f32 f32 f32 i32", True), ("f32 f32 f32 f32", False), ("f32 f32 f32 i32 i32", True),
    ("f32 f32 f32 i32 i32!", False),
])
def test_select_format_support(run, io, ok):
    assert run(f"select_supports {io}") == ["yes" if ok else "no"]


# ---- workspace and ABI arguments (fake ABI queries: decode 1000*B, +100000 at B == 3) ----

def test_prefill_layout_is_aligned_and_sized(run):
    (line,) = run("prefill_layout f16 4 9 16 24")
    gate_up, z, scores, cublas, total = map(int, line.split())
    M, I = 4 * 9, 24
    assert gate_up == 0 and z >= M * 2 * I * 2 and scores >= z + M * I * 2 and cublas >= scores + 4 * M
    assert all(off % 256 == 0 for off in (z, scores, cublas)) and total == cublas + (32 << 20)


def test_workspace_covers_the_profile(run):
    prefill_total = int(run("prefill_layout f16 4 9 16 24")[0].split()[-1])
    assert run("mlp_ws f16 4 1 16 24 1", "mlp_ws f16 2 1 16 24 1", "mlp_ws f16 100 1 16 24 1") == \
        ["103000", "2000", "103000"]  # the largest need over chunk sizes 1..min(B, 64), not the need at B
    assert run("mlp_ws f16 4 9 16 24 1", "mlp_ws f16 4 9 16 24 2") == [str(prefill_total)] * 2
    assert run("select_ws 130 24", "select_ws 5 24") == ["4096", "320"]


def test_decode_passes_what_the_plan_reserved_whatever_the_environment(run):
    # A plan built without $TDA_DECODE_VERSION reserves version 1's need (largest chunk: B == 3); run where
    # TDA_DECODE_VERSION=2, each decode call still asks for version 1 and passes version 1's bytes, within
    # the reservation (the fake query adds 500000 for version 2, as the CUDA library's v2 needs more).
    (reserved,) = run("mlp_ws f16 4 1 16 24 1")
    assert reserved == "103000"
    calls = run("decode_calls f16 70 16 24 1", decode_version_env="2")[0].split()[1:]
    assert calls == ["v1:64000", "v1:6000"] and all(int(c.split(":")[1]) <= int(reserved) for c in calls)
    # Built where TDA_DECODE_VERSION=2: version 2 reserved, recorded and passed, wherever the plan runs.
    (reserved2,) = run("mlp_ws f16 4 1 16 24 1", decode_version_env="2")
    assert reserved2 == "603000"
    assert run("decode_calls f16 4 16 24 2") == ["ok v2:504000"]


def test_decode_chunks_and_offsets(run):
    (line,) = run("decode_chunks bf16 130 16 24")
    chunks = [tok.split(":") for tok in line.split()[1:]]
    row = 16 * 2  # one [H] bf16 row
    assert chunks == [[str(b0), str(nb), str(b0 * row), str(b0 * 24 * 4), str(b0 * 4), str(b0 * row),
                       f"dtype{DTYPES.index('bfloat16')}", "det1"]
                      for b0, nb in ((0, 64), (64, 64), (128, 2))]


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_prefill_plan_computes_the_contract(run, activation):
    # The cuBLAS argument mapping, run by a reference column-major GEMM, against the contract's formula.
    (err,) = run(f"prefill_numeric 2 3 16 24 {activation}")
    assert float(err) < 1e-5


# ---- block-quantized weights (weight_format q8_0 / q4_0 / q4_1): int8 tensors of the contract's bytes ----

def _row(name: str, hidden: int) -> int:
    return hidden // contract.QUANT_BLOCK * contract.BLOCK_FORMATS[name].block_bytes


def test_every_weight_format_parses_and_is_serialized(run):
    for name in contract.WEIGHT_FORMATS:
        for cmd in ("mlp_fields", "plan_fields"):
            (answer,) = run(f"{cmd} weight_format={name}")
            assert answer == f"ok 0 0 1 silu,token_l2,{name},same,dtype,1", answer


def test_down_weight_format_parses_and_is_serialized(run):
    """A block gate_up format with a block down format of its own, in either field order; a plan without the field
    (serialized before it existed) is "same"."""
    for wf in contract.BLOCK_FORMATS:
        for down in contract.DOWN_WEIGHT_FORMATS:
            for cmd in ("mlp_fields", "plan_fields"):
                assert run(f"{cmd} weight_format={wf} down_weight_format={down}",
                           f"{cmd} down_weight_format:nul={down} weight_format={wf}") == \
                    [f"ok 0 0 1 silu,token_l2,{wf},{down},dtype,1"] * 2
    assert run("plan_fields weight_format=q4_1 decode_version=1") == ["ok 0 0 1 silu,token_l2,q4_1,same,dtype,1"]
    assert run("plan_fields weight_format=dtype down_weight_format=same") == \
        ["ok 0 0 1 silu,token_l2,dtype,same,dtype,1"]


def test_x_format_parses_and_is_serialized(run):
    """x_format q8_0 under every block weight_format (and a down format of its own), in any field order, from an
    ONNX node or a plan; absent (a plan serialized before the field existed, a node without it) it is dtype."""
    for wf in contract.BLOCK_FORMATS:
        for x in contract.X_FORMATS:
            for cmd in ("mlp_fields", "plan_fields"):
                assert run(f"{cmd} weight_format={wf} x_format={x}", f"{cmd} x_format:nul={x} weight_format={wf}",
                           f"{cmd} x_format={x} down_weight_format=q8_0 weight_format={wf}") == \
                    [f"ok 0 0 1 silu,token_l2,{wf},same,{x},1"] * 2 + [f"ok 0 0 1 silu,token_l2,{wf},q8_0,{x},1"]
    assert run("plan_fields weight_format=q4_0 decode_version=2") == ["ok 0 0 2 silu,token_l2,q4_0,same,dtype,2"]
    assert run("plan_fields x_format=dtype") == ["ok 0 0 1 silu,token_l2,dtype,same,dtype,1"]


def test_x_format_q8_0_runs_on_the_cpu_library_only(run):
    """The CUDA kernels return TDA_ERR_BAD_DTYPE for x_format q8_0 and the C++ prefill (cuBLAS on the dequantized
    weights) reads x as is: a plugin over the CUDA library refuses the field when created, naming it and what to do;
    over the CPU library (the Python plugin's CPU enqueue) it is accepted. x_format dtype runs everywhere."""
    refused = ("error SparseGatedMLP: x_format 'q8_0' runs on the CPU kernel library only, not the cuda one: "
               "rebuild the engine with x_format dtype for TensorRT")
    for cmd in ("mlp_fields", "plan_fields"):
        assert run(f"{cmd} backend=cuda weight_format=q4_0 x_format=q8_0",
                   f"{cmd} backend=cpu weight_format=q4_0 x_format=q8_0",
                   f"{cmd} backend=cuda weight_format=q4_0 x_format=dtype",
                   f"{cmd} backend=cuda") == \
            [refused, "ok 0 0 1 silu,token_l2,q4_0,same,q8_0,1", "ok 0 0 1 silu,token_l2,q4_0,same,dtype,1",
             "ok 0 0 1 silu,token_l2,dtype,same,dtype,1"]
    # a library other than the two is not assumed to run it either; field errors come first
    assert run("mlp_fields backend=metal weight_format=q8_0 x_format=q8_0") == \
        [refused.replace("not the cuda one", "not the metal one")]
    (bad,) = run("mlp_fields backend=cuda x_format=q8_0")
    assert "needs a block weight_format" in bad


def _qmlp(name, I=24, B=2, S=5, **kw):
    r = _row(name, 64)
    shapes = {"gate_up_weight": f"{I},2,{r}", "down_weight_t": f"{I},{r}", **kw}
    return f"mlp_shapes wf={name} " + _mlp(B=B, S=S, H=64, I=I, **shapes).split(" ", 1)[1]


@pytest.mark.parametrize("name", list(contract.BLOCK_FORMATS))
def test_block_weight_shapes(run, name):
    """H comes from hidden_states (the weights' last axis is row bytes); H a multiple of 32, I of 8 (the prefill's
    score reduction); the weights' last axes must be exactly H/32 blocks; errors name the tensor, the format and
    the bytes expected."""
    r, bb = _row(name, 64), contract.BLOCK_FORMATS[name].block_bytes
    assert run(_qmlp(name), _qmlp(name, B="?", S="?")) == ["ok 2 5 64 24", "ok -1 -1 64 24"]
    bad_h = _mlp(H=48, I=24, gate_up_weight=f"24,2,{_row(name, 32)}", down_weight_t=f"24,{_row(name, 32)}")
    assert run(f"mlp_shapes wf={name} " + bad_h.split(" ", 1)[1]) == \
        [f"error H (hidden size) = 48 must be a positive multiple of 32 for weight_format {name}"]
    assert run(_qmlp(name, I=13)) == ["error I (intermediate size) = 13 must be a positive multiple of 8"]
    assert run(_qmlp(name, down_weight_t=f"24,{r + 2}")) == \
        [f"error down_weight_t: last dimension {r + 2} but weight_format {name} with H = 64 needs {r} bytes "
         f"(H/32 blocks of {bb})"]
    # The same tensors as float weights are refused (H disagreeing): the format decides.
    assert run(_qmlp(name).replace(f" wf={name}", "")) == [f"error gate_up_weight: H = {r} but 64 elsewhere"]
    profile = ["2,64,64", f"24,2,{r}", f"24,{r}", "2,24", "2", "2,191", "2,24"]
    (ok,) = run(f"mlp_profile wf={name} f16 1 " + " ".join(profile))
    assert ok.startswith("ok 2 64 64 24 ws "), ok


@pytest.mark.parametrize("name, down", [("q4_1", "q8_0"), ("q4_0", "q8_0"), ("q8_0", "q4_1")])
def test_own_down_format_shapes(run, name, down):
    """down_weight_format: down_weight_t's last axis is H/32 blocks of its own format, gate_up's of weight_format;
    the error names the field and the format whose bytes are expected."""
    r, rd, bd = _row(name, 64), _row(down, 64), contract.BLOCK_FORMATS[down].block_bytes
    mixed = _qmlp(name, down_weight_t=f"24,{rd}").replace(f" wf={name}", f" wf={name} dwf={down}")
    assert run(mixed) == ["ok 2 5 64 24"]
    same = _qmlp(name).replace(f" wf={name}", f" wf={name} dwf={down}")  # down in gate_up's bytes: refused
    assert run(same) == [f"error down_weight_t: last dimension {r} but down_weight_format {down} with H = 64 needs "
                         f"{rd} bytes (H/32 blocks of {bd})"]
    assert run(mixed.replace(f" dwf={down}", "")) == \
        [f"error down_weight_t: last dimension {rd} but weight_format {name} with H = 64 needs {r} bytes "
         f"(H/32 blocks of {contract.BLOCK_FORMATS[name].block_bytes})"]
    profile = ["2,64,64", f"24,2,{r}", f"24,{rd}", "2,24", "2", "2,191", "2,24"]
    (ok,) = run(f"mlp_profile wf={name} dwf={down} f16 1 " + " ".join(profile))
    assert ok.startswith("ok 2 64 64 24 ws "), ok
    (bad,) = run(f"mlp_profile wf={name} f16 1 " + " ".join(profile))
    assert bad.startswith("error down_weight_t: last dimension"), bad


@pytest.mark.parametrize("io, ok", [
    ("f16 i8", True), ("bf16 i8 i8", True), ("f32 i8 i8 i32", True), ("f16 f16", False), ("f16 i8 f16", False),
    ("f16 i8!", False), ("f16 i8 i8 i32 i32 f32 f32 f16", True), ("f16 i8 i8 i32 i32 f32 f32 i8", False),
])
def test_block_weight_format_support(run, io, ok):
    assert run(f"mlp_supports wf=q4_0 {io}") == ["yes" if ok else "no"]
    if io.split()[1:] == ["i8"]:  # position 1 asked about
        assert run(f"mlp_supports {io}") == ["no"]  # int8 weights only with a block weight_format


def test_block_weight_prefill_dequantizes_into_the_workspace(run):
    """A prefill of block weights reserves T copies of both weights after the cuBLAS piece and points the GEMMs
    at them; float weights are read in place; decode passes the format to the C ABI."""
    H, I = 64, 24
    (line,) = run("prefill_layout wf=q4_1 bf16 4 9 64 24")
    gate_up, z, scores, cublas, total, _, weights = line.split()
    assert int(weights) % 256 == 0 and int(weights) >= int(cublas) + (32 << 20)
    assert int(total) == int(weights) + 3 * I * H * 2
    down = int(weights) + 2 * I * H * 2
    assert run("prefill_weights wf=q4_1 bf16 4 9 64 24") == [f"ok wf3 dwf3 {weights} {down} {weights} {down}"]
    assert run("prefill_weights bf16 4 9 64 24") == ["ok wf0 dwf0 in in - -"]
    assert int(run("mlp_ws wf=q8_0 bf16 4 9 64 24 2")[0]) == int(total)
    (chunks,) = run("decode_chunks wf=q8_0 bf16 2 64 24")
    assert chunks.split()[1].endswith(":wf1")
    # down in a format of its own: the same T pieces (sizes in T do not depend on the format), down_t dequantized
    # from its own format; decode passes both formats to the C ABI (down_weight_format: the field's code, 0 = same).
    assert run("prefill_layout wf=q4_1 dwf=q8_0 bf16 4 9 64 24") == [line]
    assert run("prefill_weights wf=q4_1 dwf=q8_0 bf16 4 9 64 24") == \
        [f"ok wf3 dwf1 {weights} {down} {weights} {down}"]
    (chunks,) = run("decode_chunks wf=q4_0 dwf=q8_0 bf16 2 64 24")
    assert chunks.split()[1].endswith(":wf2:dwf1")


def test_x_format_q8_0_prefill_quantizes_x_into_the_workspace(run):
    """x_format q8_0: the prefill reserves xq [M, H] in T after the dequantized weights and the gate/up GEMM reads
    it (gate_up_gemm.b) instead of hidden_states; the rest of the layout is unchanged; decode passes x_format to the
    C ABI (whose workspace query then decides the decode workspace)."""
    H, I = 64, 24
    (plain,) = run("prefill_layout wf=q4_1 bf16 4 9 64 24")
    (line,) = run("prefill_layout wf=q4_1 xf=q8_0 bf16 4 9 64 24")
    p, q = plain.split(), line.split()
    assert q[:4] + q[5:7] == p[:4] + p[5:] and q[7] == "xq"  # the same pieces, xq added at the end
    total, weights, xq = int(q[4]), int(q[6]), int(q[8])
    assert xq % 256 == 0 and xq >= int(p[4]) == weights + 3 * I * H * 2 and total == xq + 4 * 9 * H * 2
    down = weights + 2 * I * H * 2
    assert run("prefill_weights wf=q4_1 xf=q8_0 bf16 4 9 64 24", "prefill_weights wf=q4_1 bf16 4 9 64 24",
               "prefill_weights wf=q8_0 dwf=q4_0 xf=dtype f32 1 3 64 24") == \
        [f"ok wf3 dwf3 {weights} {down} {weights} {down} xf1 x:{xq} xq:{xq}",
         f"ok wf3 dwf3 {weights} {down} {weights} {down}",
         run("prefill_weights wf=q8_0 dwf=q4_0 f32 1 3 64 24")[0]]
    assert int(run("mlp_ws wf=q4_1 xf=q8_0 bf16 4 9 64 24 2")[0]) == total
    (one,) = run("prefill_layout wf=q8_0 xf=q8_0 f32 1 1 64 24")  # M = 1: one row of xq
    assert int(one.split()[4]) == int(one.split()[8]) + H * 4
    (chunks,) = run("decode_chunks wf=q4_0 dwf=q8_0 xf=q8_0 bf16 70 64 24")
    assert [c.split(":")[-3:] for c in chunks.split()[1:]] == [["wf2", "dwf1", "xf1"]] * 2
