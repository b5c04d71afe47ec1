"""The demo end to end on a tiny sample count: report files, sane metrics, quantization damage ordered by bits."""
import json

import pytest

from viditq.demo import DemoSize, run_demo


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    size = DemoSize(images=2, videos=1, steps=3, calib_prompts=1, batch_size=4)
    return out, run_demo(out, presets=["w8a8", "w4a4"], size=size)


def test_demo_writes_report_files(demo):
    out, _ = demo
    for name in ("t2i_grid.png", "t2v_videos.gif", "metrics.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    report = (out / "report.md").read_text()
    assert "![t2i_grid.png](t2i_grid.png)" in report and "| w4a4 |" in report
    saved = json.loads((out / "metrics.json").read_text())
    assert list(saved["t2i"]) == ["real", "fp", "w8a8", "w4a4"] and saved["settings"]["images"] == 2


def test_demo_metrics_are_sane(demo):
    _, results = demo
    for kind in ("t2i", "t2v"):
        rows = results[kind]
        assert rows["real"]["attribute_accuracy"] >= 0.97  # the probe reads the ground-truth renders
        assert "psnr_vs_fp" not in rows["fp"]
        # fewer bits, more damage; and the memory actually shrinks
        assert rows["w8a8"]["psnr_vs_fp"] > rows["w4a4"]["psnr_vs_fp"] > 5.0
        assert rows["w8a8"]["ssim_vs_fp"] > rows["w4a4"]["ssim_vs_fp"]
        assert rows["w4a4"]["weight_mib"] < rows["w8a8"]["weight_mib"] < rows["fp"]["weight_mib"]
    assert results["t2v"]["real"]["direction_accuracy"] == 1.0
    assert 0.0 <= results["t2v"]["w8a8"]["flicker"] < 1.0


def test_demo_rejects_unknown_presets(tmp_path):
    with pytest.raises(ValueError, match="unknown preset"):
        run_demo(tmp_path, presets=["w3a3"])
