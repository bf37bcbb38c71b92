"""Developer tools that the GPU work relies on (no GPU, no nvcc here)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptx_same_ignores_only_nvccs_file_hash():
    """Two builds of one file differ in nvcc's per-file hash inside internal names; that and nothing else is ignored."""
    FILE_HASH = load("ptx_same").FILE_HASH
    a = ".global .align 1 .b8 __nv_static_26__dbad30f6_5_ep_cu_3bd7a5dd__ZN35_INTERNAL_dbad30f6_5_ep_cu_3bd7a5dd4cudaE[1];"
    b = a.replace("dbad30f6", "94ccec3b")
    assert a != b and FILE_HASH.sub("<file>", a) == FILE_HASH.sub("<file>", b)
    c = "\tmul.lo.s64 \t%rd253, %rd252, 732;"
    assert FILE_HASH.sub("<file>", c) == c
    assert FILE_HASH.sub("<file>", c) != FILE_HASH.sub("<file>", c.replace("732", "736"))


def test_ptx_same_register_renaming_is_a_bijection_per_function():
    """--up-to-register-names forgives consistently renamed registers, never swapped operands."""
    canon = load("ptx_same").canonical_registers
    a = [".func f(", ".reg .b32 %r<9>;", "ld.global.v4.u32 {%r8, %r7}, [%rd3];", "st.global.v4.u32 [%rd4], {%r8, %r7};"]
    b = [".func f(", ".reg .b32 %r<7>;", "ld.global.v4.u32 {%r1, %r2}, [%rd3];", "st.global.v4.u32 [%rd4], {%r1, %r2};"]
    swapped = b[:3] + ["st.global.v4.u32 [%rd4], {%r2, %r1};"]
    assert a != b and canon(a) == canon(b)
    assert canon(a) != canon(swapped)
    assert canon(["add.s32 %r1, %r2, 1;"]) != canon(["add.s32 %r1, %r2, 2;"])
