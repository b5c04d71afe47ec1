"""benchmarks/ab_attention.py off the GPU: the package copies it times (from git and from the working tree) and its
argument parsing. The timing itself needs a GPU (run on the device machine)."""
import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def AB(benchmark_script):  # noqa: N802 (the module)
    return benchmark_script("ab_attention")


def test_prepare_copies_the_package_from_git_and_from_the_worktree_without_weights(AB, tmp_path):
    head = AB.prepare("old", "HEAD", tmp_path)
    work = AB.prepare("new", "worktree", tmp_path)
    committed = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:src/viditq/kernels/attention.py"],
                               check=True, capture_output=True, text=True).stdout
    assert (head / "kernels" / "attention.py").read_text() == committed
    assert (work / "kernels" / "attention.py").read_text() == (ROOT / "src/viditq/kernels/attention.py").read_text()
    assert any((ROOT / "src/viditq/models/weights").glob("*.safetensors"))  # (so the next check can fail)
    for copy in (head, work):
        assert (copy / "models" / "weights").is_dir()
        assert not list(copy.rglob("*.safetensors")) and not list(copy.rglob("__pycache__"))
    (work / "stale.py").write_text("")
    again = AB.prepare("new", "HEAD", tmp_path)  # a second prepare replaces the copy
    assert not (again / "stale.py").exists() and (again / "kernels" / "attention.py").read_text() == committed


def test_entries_and_tiles_parse(AB):
    assert AB.parse_entry("new") == ("new", {})
    assert AB.parse_entry("new:VIDITQ_A=1,B=x=y") == ("new", {"VIDITQ_A": "1", "B": "x=y"})
    for bad in ("", ":A=1", "new:A", "new:=1"):
        with pytest.raises(ValueError, match="NAME"):
            AB.parse_entry(bad)
    assert AB.parse_tiles("cogvideox_self=64,128,4,3,128;64,128,4,3 pixart_self=64,128,4,3") == {
        "cogvideox_self": [(64, 128, 4, 3, 128), (64, 128, 4, 3)], "pixart_self": [(64, 128, 4, 3)]}
    assert AB.parse_tiles(None) is None


def test_run_times_each_entry_in_its_own_copy(AB, tmp_path, monkeypatch):
    """The whole path on the CPU interpreter at a tiny shape: two copies, one entry with an environment variable;
    each process imports its own copy (the tool checks) and writes its kernel time and error."""
    monkeypatch.setattr(AB, "AB_DIR", tmp_path / "ab")
    AB.prepare("old", "HEAD", AB.AB_DIR)
    AB.prepare("new", "worktree", AB.AB_DIR)
    broken = AB.prepare("broken", "worktree", AB.AB_DIR)
    (broken / "kernels" / "attention.py").write_text("raise ImportError('broken variant')\n")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.delenv("PYTHONPATH", raising=False)
    out = tmp_path / "ab.json"
    entries = ["old", "broken", "new:VIDITQ_WS_ATTENTION=0"]
    result = AB.run(entries, str(out), ["1x1x64x320x64"], None, timeout_s=300)
    assert [r["entry"] for r in result["runs"]] == entries
    assert "broken variant" in result["runs"][1]["error"]  # a failing entry is recorded, the next one still runs
    for run, name in zip(result["runs"][::2], ("old", "new")):
        assert "error" not in run, run
        assert run["package"].startswith(str(AB.AB_DIR / name))
        (tile, timing), = run["shapes"]["1x1x64x320x64"].items()
        assert tile == "64,128,4,3,128" and timing["finite"] and timing["kernel_ms"] > 0
        assert 0 < timing["rel_l2"] < 0.2  # (the unpatched interpreter rounds fp8 coarser than the GPU)
    assert json.loads(out.read_text())["runs"][2]["entry"] == "new:VIDITQ_WS_ATTENTION=0"
