"""The `smoe` command, run as a user runs it: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

import smoe


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "smoe.cli", *args], capture_output=True, text=True, input=stdin, timeout=300,
    )


def test_generate_json(chat_checkpoint):
    out = run("generate", "--model", str(chat_checkpoint), "--prompt", "Bonjour", "--max-tokens", "12",
              "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("text", "token_ids", "prompt_tokens", "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert key in data
    model, tok = smoe.load(chat_checkpoint)
    expected = smoe.generate(model, tok, "Bonjour", max_tokens=12, ignore_eos=True)
    assert data["token_ids"] == expected.token_ids and data["text"] == expected.text
    assert data["prompt_tokens"] == len(tok.encode("Bonjour"))


def test_generate_human_output_ends_with_speed(chat_checkpoint):
    out = run("generate", "--model", str(chat_checkpoint), "--prompt", "Hello", "--max-tokens", "8",
              "--temperature", "0.8", "--top-p", "0.9", "--top-k", "40", "--min-p", "0.02", "--seed", "3",
              "--repetition-penalty", "1.1", "--dtype", "bf16", "--ignore-eos")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello")
    last = out.stderr.strip().splitlines()[-1]
    assert "tokens/s" in last and last.startswith("prompt:")


def test_generate_prompt_ids_without_tokenizer(checkpoint_factory):
    path = checkpoint_factory()
    out = run("generate", "--model", str(path), "--prompt-ids", "5,6,7", "--max-tokens", "5", "--ignore-eos", "--json")
    assert out.returncode == 0, out.stderr
    model, _ = smoe.load(path)
    assert json.loads(out.stdout)["token_ids"] == smoe.generate(model, None, [5, 6, 7], max_tokens=5, ignore_eos=True).token_ids
    text = run("generate", "--model", str(path), "--prompt", "hi")
    assert text.returncode == 2 and "no tokenizer files; pass --prompt-ids" in text.stderr


@pytest.mark.parametrize("args,message", [
    (["generate", "--model", "/no/such/dir", "--prompt", "x"], "/no/such/dir: no such directory"),
    (["generate", "--model", "CKPT", "--prompt", "x", "--top-p", "1.5"], "top_p must be a number in (0, 1]"),
    (["generate", "--model", "CKPT", "--prompt", "x", "--max-tokens", "100000"], "exceeds the model's context of 512"),
    (["generate", "--model", "CKPT", "--prompt-ids", "1,x"], "--prompt-ids must be comma-separated integers"),
    (["info", "/no/such/dir"], "not a checkpoint directory"),
])
def test_user_mistakes_exit_2_with_one_line(chat_checkpoint, args, message):
    args = [str(chat_checkpoint) if a == "CKPT" else a for a in args]
    out = run(*args)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("smoe: error:") and message in lines[0]


@pytest.mark.parametrize("args", [["generate", "--prompt", "x", "--temperature", "hot"], ["frobnicate"], ["generate"]])
def test_bad_flags_exit_2(args):
    out = run(*args)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "error:" in out.stderr


def test_info_counts_parameters_like_transformers(checkpoint_factory):
    from transformers import MixtralForCausalLM

    path = checkpoint_factory(num_local_experts=8, head_dim=16)
    out = run("info", str(path), "--json")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    hf = MixtralForCausalLM.from_pretrained(path)
    assert info["parameters"] == hf.num_parameters()
    experts = sum(p.numel() for n, p in hf.named_parameters() if ".experts." in n)
    assert info["expert_parameters"] == experts
    # one token reads everything but 6 of 8 experts per layer, and one embedding row instead of all
    embed = hf.model.embed_tokens.weight
    assert info["active_parameters_per_token"] == hf.num_parameters() - experts * 6 // 8 - embed.numel() + embed.shape[1]
    assert info["memory"]["bf16"]["bytes_read_per_token"] == 2 * info["active_parameters_per_token"]
    human = run("info", str(path))
    assert human.returncode == 0 and "active per token" in human.stdout


def test_chat_multi_turn(chat_checkpoint):
    out = run("chat", "--model", str(chat_checkpoint), "--max-tokens", "6", "--ignore-eos", "--system", "Be brief.",
              stdin="Hello there\nAnd again?\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("[prompt:") == 2
    model, tok = smoe.load(chat_checkpoint)
    first = smoe.generate(model, tok, tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]),
        max_tokens=6, ignore_eos=True)
    assert out.stdout.startswith(first.text)


def test_stop_escapes_and_info_default():
    """On the demo model (it writes newlines): --stop '\\n' is a newline, not backslash-n."""
    args = ["generate", "--prompt", "Q: Why?\nA:", "--max-tokens", "60", "--json", "--ignore-eos"]
    free = json.loads(run(*args).stdout)
    assert "\n" in free["text"]
    cut = json.loads(run(*args, "--stop", r"\n").stdout)
    assert cut["text"] == free["text"][: free["text"].index("\n")] and cut["finish_reason"] == "stop"
    info = run("info")
    assert info.returncode == 0 and "assets/demo" in info.stdout


def test_generate_into_a_closed_pipe_exits_quietly(chat_checkpoint):
    """`smoe generate ... | head -c 1`: the reader goes away; smoe exits 0 without a traceback."""
    cmd = (f"set -o pipefail; {sys.executable} -m smoe.cli generate --model {chat_checkpoint} --prompt Hello "
           "--max-tokens 300 --ignore-eos | head -c 1")
    out = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout == "H"
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr


def test_prompt_that_is_not_utf8_is_a_one_line_error(chat_checkpoint):
    for args, stdin in (([b"--prompt", b"\xff\xfe"], None), ([b"--prompt", b"-"], b"caf\xe9")):
        out = subprocess.run([sys.executable, "-m", "smoe.cli", "generate", "--model", str(chat_checkpoint), *args],
                             capture_output=True, input=stdin, timeout=300)
        assert out.returncode == 2
        err = out.stderr.decode()
        assert err.count("\n") == 1 and "not valid UTF-8" in err and "Traceback" not in err


def test_prompt_is_not_echoed_before_a_validation_error(chat_checkpoint):
    out = run("generate", "--model", str(chat_checkpoint), "--prompt", "Hello there", "--max-tokens", "100000")
    assert out.returncode == 2
    assert out.stdout == ""
    assert "exceeds the model's context" in out.stderr


def test_generate_compiled_prints_the_eager_tokens(chat_checkpoint):
    args = ("generate", "--model", str(chat_checkpoint), "--prompt", "Bonjour", "--max-tokens", "10", "--ignore-eos",
            "--dtype", "fp32", "--json")
    eager, compiled = run(*args), run(*args, "--compile")
    assert eager.returncode == 0 and compiled.returncode == 0, compiled.stderr
    assert json.loads(compiled.stdout)["token_ids"] == json.loads(eager.stdout)["token_ids"]
    traced = run(*args, "--compile", "--trace-routing", "t.json")
    assert traced.returncode == 2 and "drop --compile" in traced.stderr


# ------------------------------------------------------------------ flags people already type


ALIASES = [
    (["-m", "DIR"], ["--model", "DIR"]),
    (["-p", "Hello there"], ["--prompt", "Hello there"]),
    (["-n", "7"], ["--max-tokens", "7"]),
    (["--n-predict", "7"], ["--max-tokens", "7"]),
    (["--temp", "0.9"], ["--temperature", "0.9"]),
    (["--repeat-penalty", "1.2"], ["--repetition-penalty", "1.2"]),
]


@pytest.mark.parametrize("short,long", ALIASES)
def test_flag_aliases_parse_as_their_long_form(short, long):
    """llama.cpp's and mlx-lm's spellings set exactly what smoe's own do."""
    from smoe.cli import build_parser

    base = ["generate", "--prompt", "x"] if "-p" not in short else ["generate"]
    parse = build_parser().parse_args
    assert vars(parse([*base, *short])) == vars(parse([*base, *long]))


def test_flag_aliases_generate_what_the_long_forms_do(chat_checkpoint):
    short = run("generate", "-m", str(chat_checkpoint), "-p", "Bonjour", "-n", "6", "--temp", "0.7",
                "--repeat-penalty", "1.1", "--seed", "5", "--ignore-eos", "--json")
    long = run("generate", "--model", str(chat_checkpoint), "--prompt", "Bonjour", "--max-tokens", "6",
               "--temperature", "0.7", "--repetition-penalty", "1.1", "--seed", "5", "--ignore-eos", "--json")
    assert short.returncode == 0 and long.returncode == 0, short.stderr + long.stderr
    assert json.loads(short.stdout)["token_ids"] == json.loads(long.stdout)["token_ids"]
    assert len(json.loads(short.stdout)["token_ids"]) == 6


def test_prompt_dash_reads_stdin(chat_checkpoint):
    a = run("generate", "-m", str(chat_checkpoint), "-p", "-", "-n", "5", "--ignore-eos", "--json", stdin="Bonjour")
    b = run("generate", "-m", str(chat_checkpoint), "-p", "Bonjour", "-n", "5", "--ignore-eos", "--json")
    assert json.loads(a.stdout)["token_ids"] == json.loads(b.stdout)["token_ids"]


def test_system_prompt_wraps_the_prompt_in_the_chat_template(chat_checkpoint):
    model, tok = smoe.load(chat_checkpoint)
    out = run("generate", "-m", str(chat_checkpoint), "-p", "Hello there", "--system-prompt", "Be brief.", "-n", "6",
              "--ignore-eos", "--json")
    ids = tok.apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    data = json.loads(out.stdout)
    assert data["prompt_tokens"] == len(ids)
    assert data["token_ids"] == smoe.generate(model, tok, ids, max_tokens=6, ignore_eos=True).token_ids
    chat = run("chat", "-m", str(chat_checkpoint), "--system-prompt", "Be brief.", "-n", "6", "--ignore-eos",
               stdin="Hello there\n")
    assert chat.returncode == 0 and chat.stdout.startswith(smoe.generate(model, tok, ids, max_tokens=6,
                                                                          ignore_eos=True).text)


def test_verbose_prints_speeds_and_peak_memory_as_mlx_lm_does(chat_checkpoint):
    out = run("generate", "-m", str(chat_checkpoint), "-p", "Hello", "-n", "5", "--ignore-eos", "--verbose")
    assert out.returncode == 0, out.stderr
    lines = out.stderr.strip().splitlines()[-4:]
    assert lines[0] == "=========="
    assert re.fullmatch(r"Prompt: \d+ tokens, [\d.]+ tokens-per-sec", lines[1])
    assert re.fullmatch(r"Generation: 5 tokens, [\d.]+ tokens-per-sec", lines[2])
    peak = float(re.fullmatch(r"Peak memory: ([\d.]+) GB", lines[3]).group(1))
    assert 0.05 < peak < 24


def test_version():
    out = run("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"smoe {smoe.__version__}"
