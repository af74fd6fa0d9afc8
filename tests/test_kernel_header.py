"""cuda/include/tda_kernels.h enums must equal the contract's list positions."""
import ctypes
import re
from pathlib import Path

from tda_export.kernels import abi
from tda_export.ops.contract import ACTIVATIONS, DTYPES, QUANT_BLOCK, SCORE_NORMS, WEIGHT_FORMATS, X_FORMATS

HEADER = Path(__file__).resolve().parents[1] / "cuda" / "include" / "tda_kernels.h"


def _enum(name: str) -> dict[str, int]:
    body = re.search(r"typedef enum \{([^}]*)\}\s*" + name + ";", HEADER.read_text()).group(1)
    return {k: int(v) for k, v in re.findall(r"(\w+)\s*=\s*(\d+)", body)}


def test_enums_match_contract():
    assert _enum("tda_dtype_t") == {"TDA_F32": DTYPES.index("float32"), "TDA_F16": DTYPES.index("float16"),
                                    "TDA_BF16": DTYPES.index("bfloat16")}
    assert _enum("tda_activation_t") == {f"TDA_ACT_{a.upper()}": i for i, a in enumerate(ACTIVATIONS)}
    assert _enum("tda_score_norm_t") == {f"TDA_SCORE_NORM_{n.upper()}": i for i, n in enumerate(SCORE_NORMS)}
    assert _enum("tda_weight_format_t") == {f"TDA_WEIGHTS_{n.upper()}": i for i, n in enumerate(WEIGHT_FORMATS)}
    assert abi.WEIGHT_FORMAT_CODE == {n: i for i, n in enumerate(WEIGHT_FORMATS)}
    assert _enum("tda_x_format_t") == {f"TDA_X_{n.upper()}": i for i, n in enumerate(X_FORMATS)}
    assert abi.X_FORMAT_CODE == {n: i for i, n in enumerate(X_FORMATS)}


def test_python_mirror_matches_header():
    text = HEADER.read_text()
    assert int(re.search(r"#define TDA_MAX_BATCH (\d+)", text).group(1)) == abi.MAX_BATCH
    assert int(re.search(r"#define TDA_SIZE_MULTIPLE (\d+)", text).group(1)) == abi.SIZE_MULTIPLE
    assert int(re.search(r"#define TDA_QUANT_BLOCK (\d+)", text).group(1)) == QUANT_BLOCK == abi.QUANT_BLOCK_SIZE
    status = _enum("tda_status_t")
    assert status["TDA_OK"] == abi.TDA_OK
    assert sorted(status.values()) == list(range(len(status)))


def test_abi_version_matches_mirror():
    """The ctypes mirror's struct layouts follow TDA_KERNELS_ABI_VERSION (3: tda_select_args_t.density_bounds;
    4: tda_decode_args_t.weight_format; 5: tda_block_linear_args_t; 6: tda_decode_args_t.down_weight_format; 7: x_format in both decode and block linear args)."""
    text = HEADER.read_text()
    assert int(re.search(r"#define TDA_KERNELS_ABI_VERSION (\d+)", text).group(1)) == abi.ABI_VERSION
    select = re.search(r"typedef struct \{([^}]*)\}\s*tda_select_args_t;", text).group(1)
    fields = re.findall(r"(\w+);", select)
    assert fields == [name for name, _ in abi.SelectArgs._fields_]
    decode = re.search(r"typedef struct \{([^}]*)\}\s*tda_decode_args_t;", text).group(1)
    decode = re.sub(r"/\*.*?\*/", "", decode, flags=re.S)
    assert re.findall(r"(\w+);", decode) == [name for name, _ in abi.DecodeArgs._fields_]
    linear = re.search(r"typedef struct \{([^}]*)\}\s*tda_block_linear_args_t;", text).group(1)
    linear = re.sub(r"/\*.*?\*/", "", linear, flags=re.S)
    assert re.findall(r"(\w+);", linear) == [name for name, _ in abi.BlockLinearArgs._fields_]
    # The C types too: the int64 strides and the int32 sizes are where a mirror would silently go wrong.
    types = dict((name, ctype) for ctype, name in re.findall(r"(int32_t|int64_t|const float\*|const void\*|float\*)\s+(\w+);",
                                                            linear))
    width = {"int32_t": 4, "int64_t": 8}
    for name, ctype in abi.BlockLinearArgs._fields_:
        if types[name] in width:
            assert ctypes.sizeof(ctype) == width[types[name]], name
