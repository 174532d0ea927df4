"""The benchmark suite end to end on tiny shapes: every workload runs, the JSON has its keys, nothing is WRONG."""
import json

import pytest

from pspnet_fast import available_backends
from pspnet_fast.benchmarks import suite
from pspnet_fast.benchmarks.common import JSON_KEYS


def test_quick_suite_writes_json_and_nothing_is_wrong(tmp_path, capsys):
    path = tmp_path / "bench.json"
    # The smallest complete run: every workload at its quick shape, no torch.compile (minutes of compiling), one
    # timed round. Measures nothing worth reading; checks that every provider runs and agrees with the reference.
    rc = suite.main(["--quick", "--no-compile", "--rounds", "1", "--warmup", "0", "--json", str(path)])
    out = capsys.readouterr().out
    rows = json.loads(path.read_text())
    assert rc == 0, out
    assert {r["workload"] for r in rows} == set(suite.WORKLOADS)
    for r in rows:
        assert set(JSON_KEYS) <= set(r), sorted(set(JSON_KEYS) - set(r))
        assert r["wrong"] is False, r
        assert set(r["versions"]) >= {"torch", "triton", "python"}
        assert r["median_ms"] > 0
    providers = {r["provider"] for r in rows}
    assert {"reference", "copy"} <= providers
    if available_backends()["cpu"]["available"]:
        assert "fused-cpu" in providers, providers
    # the head and model workloads time the fused head itself (pspnet_fast.PSPHead, PSPNet(fused=True))
    if available_backends()["cpu"]["available"]:
        assert {"head", "head-train", "pspnet"} <= {r["workload"] for r in rows if r["provider"] == "fused-cpu"}
    assert "WRONG" not in out and "FAILED" not in out


@pytest.mark.parametrize("shape", ["1,2048,60", "1,2048,60,x", "1,6,8,8", "0,8,8,8", "1,8,0,8"])
def test_bad_shape_is_an_argparse_error(shape, capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["--shape", shape])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shape" in err and "N,C,H,W" in err and repr(shape) in err, err


def test_unknown_workload_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        suite.main(["--workload", "ppm,nope"])
    assert e.value.code == 2
    assert "unknown workload 'nope'" in capsys.readouterr().err
