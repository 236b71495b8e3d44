"""benchmarks/tuning/ncu_linear.py's summary of ncu CSV output (the profiled run itself needs a GPU and ncu)."""
import pytest

from benchmarks.tuning import ncu_linear

HEADER = '"ID","Process ID","Kernel Name","Section Name","Metric Name","Metric Unit","Metric Value"'


def _row(i, name, metric, value):
    return f'"{i}","7","{name}","Command line profiler metrics","{metric}","x","{value}"'


def _csv():
    rows = [HEADER]
    for i, name, t, r, w, occ in ((0, "_fwd_kernel", "2,000", "3,000,000", "1,000,000", "12.5"),
                                  (1, "_bwd_dk_kernel", "4,000", "2,000,000", "2,000,000", "")):
        rows += [_row(i, name, "gpu__time_duration.sum", t), _row(i, name, "dram__bytes_read.sum", r),
                 _row(i, name, "dram__bytes_write.sum", w), _row(i, name, "Achieved Occupancy", occ)]
    return "==PROF== Connected to process 1\n" + "\n".join(rows) + "\n==PROF== Disconnected\n"


def test_summary_parses_each_kernel_in_launch_order():
    ks = ncu_linear.summarise(_csv())
    assert [k["name"] for k in ks] == ["_fwd_kernel", "_bwd_dk_kernel"]
    assert ks[0]["time"] == 2000.0 and ks[0]["read"] == 3e6 and ks[0]["write"] == 1e6 and ks[0]["occupancy"] == 12.5
    assert "occupancy" not in ks[1]   # an empty value is left out, not read as zero


def test_table_rates_and_total():
    lines = ncu_linear.table(ncu_linear.summarise(_csv())).splitlines()
    fwd, dk, total = lines[1].split(), lines[2].split(), lines[3].split()
    assert fwd[0] == "_fwd_kernel" and float(fwd[1]) == 2.0 and float(fwd[4]) == 2.0    # 4 MB in 2 us: 2 TB/s
    assert dk[0] == "_bwd_dk_kernel" and float(dk[4]) == 1.0 and dk[5] == "nan"
    assert total[0] == "total" and float(total[1]) == 6.0 and float(total[2]) == pytest.approx(0.005)
    assert float(total[4]) == pytest.approx(8e6 / 6000 / 1e3, abs=0.005)   # printed to 2 places


def test_summary_refuses_other_text():
    with pytest.raises(ValueError, match="no ncu CSV rows"):
        ncu_linear.summarise("==PROF== nothing profiled\n")
    with pytest.raises(ValueError, match="not ncu --csv output"):
        ncu_linear.summarise('"a","b"\n"1","2"\n')


def test_shape_argument_is_checked():
    with pytest.raises(SystemExit):
        ncu_linear.main(["run", "--shape", "16by4096"])
