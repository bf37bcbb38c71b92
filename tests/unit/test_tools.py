"""Developer tools that the GPU work relies on (dev/ and dev/device/; no GPU, no nvcc here)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load(path):
    """A script under dev/ as a module: load("dev/ptx_same.py")."""
    name = Path(path).stem
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ptx_same_ignores_only_nvccs_file_hash():
    """Two builds of one file differ in nvcc's per-file hash inside internal names; that and nothing else is ignored."""
    FILE_HASH = load("dev/ptx_same.py").FILE_HASH
    a = (".global .align 1 .b8 "
         "__nv_static_26__dbad30f6_5_ep_cu_3bd7a5dd__ZN35_INTERNAL_dbad30f6_5_ep_cu_3bd7a5dd4cudaE[1];")
    b = a.replace("dbad30f6", "94ccec3b")
    assert a != b and FILE_HASH.sub("<file>", a) == FILE_HASH.sub("<file>", b)
    c = "\tmul.lo.s64 \t%rd253, %rd252, 732;"
    assert FILE_HASH.sub("<file>", c) == c
    assert FILE_HASH.sub("<file>", c) != FILE_HASH.sub("<file>", c.replace("732", "736"))


def test_rig_prebuild_lists_every_kernel_the_rig_needs():
    """16 ranks need their own expert count (8 experts do not divide 16); 2 and 8 ranks keep the usual kernels."""
    from epcomm.backends.gpu import specs
    cfgs = load("dev/device/rig_prebuild.py").rig_configs([2, 8, 16], 8)
    worlds = {c.world_size for c in cfgs}
    assert worlds == {2, 4, 8, 16}   # 4: the fencing checks (step fence4 / fencelive), whatever the worlds asked
    assert {(c.hidden, c.mode, str(c.token_format)) for c in specs.fence_configs(4)} <= \
        {(c.hidden, c.mode, str(c.token_format)) for c in cfgs if c.world_size == 4}
    assert all(c.num_experts % c.world_size == 0 for c in cfgs)
    assert {c.num_experts for c in specs.test_configs(16)} == {16}
    assert {c.num_experts for c in specs.test_configs(2)} == {8} == {c.num_experts for c in specs.test_configs(8)}
    assert sum(c.world_size == 8 and c.hidden == 256 and c.max_tokens_per_rank == 48 for c in cfgs) >= 3  # smoke


def test_rig_summary_table_and_json(tmp_path):
    (tmp_path / "w2.log").write_text("[rank 0] SUMMARY pass=167 fail=0 (all ranks fail=0)\n"
                                     "[rank 1] SUMMARY pass=167 fail=0 (all ranks fail=0)\n")
    (tmp_path / "m.log").write_text("[rank 0] SUMMARY pass=160 fail=7\n[rank 1] SUMMARY pass=167 fail=0\n")
    (tmp_path / "w8.log").write_text("[rank 0] SUMMARY pass=167 fail=0\n")      # 7 ranks never reported
    (tmp_path / "moe.log").write_text("[rank 0] moe_layer ll/fp8: OK (x)\n[rank 1] moe_layer ll/fp8: OK (x)\n")
    rows = [("prebuild", "-", "-", "-", "0", "40", "p.log", "build"),
            ("w2", "one-gpu-2", "2", "", "0", "55", tmp_path / "w2.log", "worker"),
            ("mps50", "one-gpu-2", "2", "50", "1", "95", tmp_path / "m.log", "worker"),
            ("w8", "one-gpu-8", "8", "", "0", "80", tmp_path / "w8.log", "worker"),
            ("moe-ll-fp8", "one-gpu-2", "2", "", "0", "12", tmp_path / "moe.log", "moe"),
            ("w2x8", "one-gpu-2x8", "16", "", "skip", "0", "x", "worker")]
    tsv = tmp_path / "steps.tsv"
    tsv.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    assert load("dev/device/rig_summary.py").main([str(tsv), str(tmp_path)]) == 1
    import json
    s = json.loads((tmp_path / "rig-summary.json").read_text())
    status = {r["step"]: r["status"] for r in s["steps"]}
    assert status == {"prebuild": "PASS", "w2": "PASS", "mps50": "FAIL", "w8": "FAIL", "moe-ll-fp8": "PASS",
                      "w2x8": "NOT RUN"}
    by = {r["step"]: r for r in s["steps"]}
    assert by["w2"]["checks_text"] == "167/167 x2" and by["mps50"]["mps_percent"] == 50
    assert by["mps50"]["checks"]["0"] == {"passed": 160, "run": 167}
    assert "7 ranks silent" in by["w8"]["checks_text"]
    assert not s["ok"]


def test_one_gpu_rig_script_parses_and_names_real_files():
    import re
    import subprocess
    script = ROOT / "dev" / "device" / "one_gpu_rig.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for cfg in set(re.findall(r"configs/([\w-]+)\.yaml", text)) | set(re.findall(r"\b(one-gpu-[\w-]+)\b", text)):
        assert (ROOT / "configs" / f"{cfg}.yaml").is_file(), cfg
    tools = re.findall(r"\b((?:dev|tools|tests|examples)/[\w/]+\.(?:py|sh))", text)
    assert "dev/device/rig_prebuild.py" in tools
    for tool in tools:
        assert (ROOT / tool).is_file(), tool
    # the safety environment is set for every step
    assert "NVSHMEM_DISABLE_NVLS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1" in text


def test_ptx_same_register_renaming_is_a_bijection_per_function():
    """--up-to-register-names forgives consistently renamed registers, never swapped operands."""
    canon = load("dev/ptx_same.py").canonical_registers
    a = [".func f(", ".reg .b32 %r<9>;", "ld.global.v4.u32 {%r8, %r7}, [%rd3];", "st.global.v4.u32 [%rd4], {%r8, %r7};"]
    b = [".func f(", ".reg .b32 %r<7>;", "ld.global.v4.u32 {%r1, %r2}, [%rd3];", "st.global.v4.u32 [%rd4], {%r1, %r2};"]
    swapped = b[:3] + ["st.global.v4.u32 [%rd4], {%r2, %r1};"]
    assert a != b and canon(a) == canon(b)
    assert canon(a) != canon(swapped)
    assert canon(["add.s32 %r1, %r2, 1;"]) != canon(["add.s32 %r1, %r2, 2;"])


def test_rig_summary_counts_the_fencing_survivors(tmp_path):
    """fence4 (tests/gpu/fence_one_rank.py): one ok line per survivor passes; a FAIL line or NOT BUILT does not."""
    ok = "".join(f"rank {r}: rank 3 killed in round 2 (ll, gpu), then 100 rounds without it: ok (3.0 s)\n"
                 for r in range(3))
    (tmp_path / "ok.log").write_text(ok)
    (tmp_path / "bad.log").write_text(ok.replace("rank 1: rank 3 killed", "FAIL rank 1: round 5: x\nrank 9: -"))
    (tmp_path / "nb.log").write_text("rank 0: NOT BUILT: EPInputError ...\n")
    # fencelive (tests/gpu/fence_live.py): one ok line per rank
    (tmp_path / "live.log").write_text("".join(f"rank {r}: fence_live ok (gpu, 9.0 s)\n" for r in range(4)))
    rows = [("fence4-ll", "one-gpu-4", "3", "", "0", "20", tmp_path / "ok.log", "fence"),
            ("fence4-ht", "one-gpu-4", "3", "", "0", "20", tmp_path / "bad.log", "fence"),
            ("fence4-x", "one-gpu-4", "3", "", "2", "5", tmp_path / "nb.log", "fence"),
            ("fencelive", "one-gpu-4", "4", "", "0", "30", tmp_path / "live.log", "fence")]
    tsv = tmp_path / "steps.tsv"
    tsv.write_text("".join("\t".join(map(str, r)) + "\n" for r in rows))
    load("dev/device/rig_summary.py").main([str(tsv), str(tmp_path)])
    import json
    s = json.loads((tmp_path / "rig-summary.json").read_text())
    assert {r["step"]: r["status"] for r in s["steps"]} == {"fence4-ll": "PASS", "fence4-ht": "FAIL",
                                                            "fence4-x": "FAIL", "fencelive": "PASS"}


def test_every_device_script_parses_and_names_real_files():
    """Each dev/device/*.sh parses, the files it names exist, and the ones that run ranks source device_env.sh (the
    multicast-off environment) or set it themselves."""
    import re
    import subprocess
    for script in sorted((ROOT / "dev" / "device").glob("*.sh")):
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, script.name
        text = script.read_text()
        for tool in re.findall(r"\b((?:dev|tests|examples)/[\w/]+\.(?:py|sh))", text):
            assert (ROOT / tool).is_file(), (script.name, tool)
        for cfg in re.findall(r"configs/([\w-]+)\.yaml", text):
            assert (ROOT / "configs" / f"{cfg}.yaml").is_file(), (script.name, cfg)
        if "launch run" in text or "launch bench" in text:
            assert "device_env.sh" in text or "NVSHMEM_DISABLE_NVLS=1" in text, script.name


def test_small_ab_summary_keeps_layouts_apart(tmp_path, capsys):
    """The grouped and batched rows of one (op, mode, format) are separate rows of the summary, each with its own
    change against the reference arm (they were merged into one key, the last one read winning)."""
    import json
    import sys
    mod = load("dev/device/small_ab_summary.py")

    def row(layout, med):
        return {"impl": "epcomm", "status": "ok", "op": "combine", "mode": "ll", "layout": layout, "format": "bf16",
                "time_us": {"median": med, "p10": med - 1}}
    for arm, grouped, batched in (("baseline", 40.0, 72.0), ("bscan", 40.5, 41.0)):
        for rep in (1, 2):
            (tmp_path / f"ll-{arm}-rep{rep}.json").write_text(
                json.dumps({"results": [row("grouped", grouped + rep), row("batched", batched + rep)]}))
    argv = sys.argv
    sys.argv = ["small_ab_summary.py", str(tmp_path), "-", "bscan", "--out", str(tmp_path / "s")]
    try:
        assert mod.main() == 0
    finally:
        sys.argv = argv
    res = {(r["layout"], r["arm"]): r for r in json.loads((tmp_path / "s.json").read_text())}
    assert res[("batched", "bscan")]["change_us"] == -31.0
    assert res[("grouped", "bscan")]["change_us"] == 0.5
    assert "batched" in capsys.readouterr().out
