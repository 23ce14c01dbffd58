"""``interpkv`` command-line errors: one stderr line and exit 2, the traceback only with ``--debug``.

Also what the HTML report states (versions, command, dtype, tolerances), how
passing models collapse, and its size.
"""

import json
import re

import pytest
import torch
import transformers

import interpkv
from interpkv import zoo
from interpkv.cli import app as cli
from interpkv.diagnostics.hf_reference import hf_difference
from interpkv.verify import checks


def run(capsys, *argv):
    status = cli.main(list(argv))
    out = capsys.readouterr()
    return status, out.out, out.err


def one_error_line(err: str) -> str:
    # Progress lines ("[1/1] checking gpt2", stderr not being a terminal here) are not errors.
    lines = [line for line in err.splitlines() if line.strip() and not re.match(r"^\[\d+/\d+\] ", line)]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("models") / "my-llama"
    zoo.load_pair("llama")[1].save_pretrained(path)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"interpkv {interpkv.__version__}"


def test_missing_path_says_it_does_not_exist(capsys, tmp_path):
    status, _, err = run(capsys, "check", str(tmp_path / "nope"))
    assert status == 2 and one_error_line(err).endswith(
        f"{tmp_path / 'nope'}: does not exist (give a directory written by model.save_pretrained(dir))"
    )


def test_a_file_is_not_a_model_directory(capsys, tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    status, _, err = run(capsys, "check", str(tmp_path / "weights.bin"))
    assert status == 2 and "is a file, not a model directory" in one_error_line(err)


def test_broken_config_json(capsys, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama",')
    status, _, err = run(capsys, "check", str(tmp_path))
    line = one_error_line(err)
    assert status == 2 and "config.json: broken config.json, not valid JSON" in line and "line 1" in line


def test_config_without_model_type(capsys, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    status, _, err = run(capsys, "check", str(tmp_path))
    assert status == 2 and "no 'model_type'" in one_error_line(err)


def test_folder_without_weights(capsys, tmp_path, llama_dir):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())
    status, _, err = run(capsys, "check", str(tmp_path))
    assert status == 2 and one_error_line(err).endswith(
        f"{tmp_path}: no weights (model.safetensors or pytorch_model.bin) next to config.json"
    )


def test_model_type_unknown_to_transformers(capsys, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "not-a-model"}))
    status, _, err = run(capsys, "check", str(tmp_path))
    assert status == 2 and "unsupported architecture, model_type 'not-a-model'" in one_error_line(err)


@pytest.fixture(scope="module")
def biogpt_dir(tmp_path_factory):
    # A causal LM transformers loads but TransformerLens cannot convert.
    cfg = transformers.BioGptConfig(
        vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32,
    )
    path = tmp_path_factory.mktemp("models") / "biogpt"
    transformers.BioGptForCausalLM(cfg).save_pretrained(path)
    return path


def test_architecture_transformer_lens_cannot_convert(capsys, biogpt_dir):
    status, _, err = run(capsys, "check", str(biogpt_dir))
    line = one_error_line(err)
    assert status == 2 and "unsupported architecture, TransformerLens cannot convert it" in line
    assert "BioGptForCausalLM" in line


def test_debug_shows_the_traceback(capsys, biogpt_dir, tmp_path):
    with pytest.raises(NotImplementedError, match="BioGptForCausalLM"):
        cli.main(["check", str(biogpt_dir), "--debug"])
    with pytest.raises(ValueError, match="does not exist"):
        cli.main(["check", str(tmp_path / "nope"), "--debug"])


def test_an_unexpected_error_is_one_line_too(capsys, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(checks, "check_zoo", boom)
    status, _, err = run(capsys, "check", "gpt2")
    assert status == 2
    assert one_error_line(err) == "interpkv: error: RuntimeError: first line (run again with --debug for the traceback)"


@pytest.mark.parametrize("command", ["check", "demo"])
def test_unwritable_html_fails_before_the_checks_run(capsys, tmp_path, monkeypatch, command):
    ran = []
    monkeypatch.setattr(cli, "_run_checks", lambda *a, **k: ran.append(a) or [])
    (tmp_path / "a-file").write_text("")
    target = tmp_path / "a-file" / "report.html"  # a directory that cannot be created
    argv = [command, "--html", str(target)] + (["gpt2"] if command == "check" else [])
    status, _, err = run(capsys, *argv)
    assert status == 2 and ran == []
    assert one_error_line(err).startswith(f"interpkv: error: --html {target}: cannot be written")
    status, _, err = run(capsys, *argv[:2], str(tmp_path), *argv[3:])  # a directory
    assert status == 2 and "is a directory" in one_error_line(err) and ran == []


def test_writable_html_check_leaves_no_file(tmp_path):
    from interpkv.cli.inputs import check_writable

    check_writable(str(tmp_path / "new" / "report.html"))
    assert not (tmp_path / "new" / "report.html").exists()


def test_hf_difference_excuses_only_padded_rows():
    cached = torch.zeros(3, 2, 4, dtype=torch.float64)
    reference = torch.zeros((3, 2, 4), dtype=torch.float64)
    reference[..., 0] = 0.5  # centred over the vocabulary: [0.375, -0.125, -0.125, -0.125]
    reference[1] = float("nan")
    mask = torch.tensor([[1, 1], [0, 1], [1, 1]])
    assert hf_difference(cached, reference, mask) == (0.375, [1])
    shifted = torch.full((3, 2, 4), 7.0, dtype=torch.float64)  # a constant shift (center_unembed)
    assert hf_difference(cached, shifted, mask) == (0.0, [])
    reference[2, 1, 0] = float("nan")  # a row without padding: never excused
    value, rows = hf_difference(cached, reference, mask)
    assert rows == [1] and value != value
    mask_all = torch.tensor([[0, 1], [0, 1], [0, 1]])
    reference[:] = float("nan")
    assert hf_difference(cached, reference, mask_all) == (None, [0, 1, 2])


def test_float64_check_judges_every_row_against_hf(capsys, tmp_path):
    """HF float64 turns left-padded llama rows into NaN; the reference re-runs them alone.

    So no row is excused any more (the note of ``hf_difference`` stays for a
    NaN that a lone re-run cannot fix) and the check is a real float64 PASS.
    """
    path = tmp_path / "report.html"
    status, out, _ = run(capsys, "check", "llama", "--dtype", "float64", "--html", str(path))
    assert status == 0, out
    assert "HF reference n/a" not in out
    row = [line for line in out.splitlines() if line.startswith("│ llama")][0]
    assert "PASS" in row and "nan" not in row


def test_a_report_with_a_figure_embeds_plotly_js_once(capsys, tmp_path, monkeypatch):
    from plotly.offline import get_plotlyjs

    monkeypatch.setitem(checks.CACHED_TOL, torch.float32, 0.0)  # a failing model: its heatmap is drawn
    path = tmp_path / "report.html"
    status, _, _ = run(capsys, "check", "gpt2", "--html", str(path))
    page = path.read_text()
    plotly_js = get_plotlyjs()
    assert status == 1 and page.count('class="figure"') == 1
    assert page.count(plotly_js[:200]) == 1 and len(page.encode()) < len(plotly_js.encode()) + 200_000


def test_report_states_versions_command_dtype_tolerances_and_stays_small(capsys, tmp_path):
    path = tmp_path / "report.html"
    status, _, _ = run(capsys, "check", "gpt2", "bloom", "--html", str(path))
    assert status == 0
    page = path.read_text()
    for package in ("interpkv", "torch", "transformer-lens", "transformers"):
        assert re.search(rf"<td[^>]*>{package}</td><td[^>]*>\d+\.\d+", page), package
    assert f"interpkv check gpt2 bloom --html {path}" in page
    assert "<td class=\"\">float32</td>" in page and "5.00e-05" in page and "1.00e-04" in page
    assert 'data-figure="heatmap:' not in page and "2 PASS</span>" in page
    from plotly.offline import get_plotlyjs

    # No figure, so no plotly.js (4.8 MB): the page is its tables.
    assert get_plotlyjs()[:200] not in page and "<script" not in page
    assert len(page.encode()) < 60_000
