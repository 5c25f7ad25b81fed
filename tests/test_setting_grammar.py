"""W-A-KV settings (analysis/quantization.parse_setting) that the quantizers cannot apply as written,
refused by both evaluation tools before anything is looked at, naming the setting."""

from __future__ import annotations

import re
import sys

import pytest

from hf_run_fixtures import REPO
from megatron_osp.analysis.quantization import parse_setting

BAD = {
    "33-4-4": "weight bits 33 are outside 2..16 (16: not quantized)",
    "4-17-4": "activation bits 17 are outside 2..16",
    "4-4-99999999999999999999": "KV bits 99999999999999999999 are outside 2..16",
    "4-4-4+had+had": "a '+' option is given twice",
    "16-4-4+gptq": "+gptq needs weights quantized (weight bits below 16)",
    "16-4-4-g32": "-g needs weights quantized",
}


def test_bits_outside_what_the_quantizers_apply_are_refused():
    """'33-4-4' was taken as a setting (weights left in full precision, as for 16 bits, under a name
    that says 33), and so were a flag given twice and GPTQ or a group size on unquantized weights
    (nothing to round). Each is refused naming the setting; what is meaningful still parses."""
    for text, why in BAD.items():
        with pytest.raises(ValueError, match=re.escape(f"quantization setting '{text}': {why}")):
            parse_setting(text)
    assert parse_setting("16-16-16+quarot").rotate and parse_setting("4-16-16").name == "4-16-16"
    assert parse_setting("2-15-16").name == "2-15-16" and parse_setting("16-16-16").name == "fp"


@pytest.mark.parametrize("tool", ["evaluate_downstream", "evaluate_quantization"])
def test_the_tools_refuse_a_bad_setting_before_anything_else(tool, tmp_path, capsys):
    sys.path.insert(0, str(REPO / "tools"))
    main = __import__(tool).main
    args = {"evaluate_downstream": ["--settings", "fp,33-4-4", "--tasks", "anything"],
            "evaluate_quantization": ["--settings", "fp", "33-4-4", "--data", str(tmp_path / "data")]}[tool]
    out = tmp_path / "out"
    assert main([str(tmp_path / "model"), *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: quantization setting '33-4-4': weight bits 33 are outside 2..16" in err and not out.exists(), err


@pytest.mark.parametrize("tool", ["evaluate_downstream", "evaluate_quantization"])
def test_two_spellings_of_one_setting_are_refused(tool, tmp_path, capsys):
    """evaluate_quantization --settings fp 4-4-4 04-4-4 evaluated 4-4-4 twice and, finished, wrote its
    report marked partial ("complete": false: the progress counted three units, the report keyed two by
    name). Both tools now refuse two settings of one name before anything else."""
    sys.path.insert(0, str(REPO / "tools"))
    main = __import__(tool).main
    given = ["fp", "4-4-4", "04-4-4"]
    args = {"evaluate_downstream": ["--settings", ",".join(given), "--tasks", "anything"],
            "evaluate_quantization": ["--settings", *given, "--data", str(tmp_path / "data")]}[tool]
    out = tmp_path / "out"
    assert main([str(tmp_path / "model"), *args, "--output-dir", str(out)]) == 2
    err = capsys.readouterr().err
    assert "error: --settings: 4-4-4 given twice (fp, 4-4-4, 04-4-4)" in err and not out.exists(), err
    from megatron_osp.analysis.quantization import parse_settings

    with pytest.raises(ValueError, match=re.escape("--settings: fp given twice (16-16-16, fp)")):
        parse_settings(["16-16-16", "fp"])
