"""The sampling CLI: python -m mpt_kernels.generate --model DIR --prompt "..." (tokenizer.json in DIR)."""
import os
import subprocess
import sys

import pytest
import torch

from _subproc import NEUTRAL_CWD, subprocess_env
from mpt_kernels.generate import TextStreamer
from mpt_kernels.model import MPTConfig, MPTForCausalLM

tokenizers = pytest.importorskip("tokenizers")

WORDS = "the a cat dog sat ran on mat log and then it was <|endoftext|>".split()


def make_model_dir(path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(os.path.join(path, "tokenizer.json"))
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=len(vocab), max_seq_len=8,
                    attn_config=dict(attn_impl="flash"))
    model = MPTForCausalLM(cfg)
    model.save_pretrained(path)
    return model, tok


def test_cli_streams_greedy_tokens(tmp_path):
    model, tok = make_model_dir(tmp_path)
    prompt = "the cat sat on"
    ids = torch.tensor([tok.encode(prompt).ids])
    expected = model.generate(ids, 12, temperature=0)[0, ids.shape[1]:].tolist()  # past max_seq_len 8
    eos = tok.token_to_id("<|endoftext|>")
    if eos in expected:
        expected = expected[:expected.index(eos) + 1]
    env = subprocess_env(OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-m", "mpt_kernels.generate", "--model", str(tmp_path), "--prompt", prompt,
                        "--max-new-tokens", "12", "--temperature", "0", "--device", "cpu"],
                       capture_output=True, text=True, env=env, timeout=120,
                       cwd=NEUTRAL_CWD)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(prompt)
    assert r.stdout[len(prompt):].strip() == tok.decode(expected).strip()
    assert "tokens/s" in r.stderr


def test_cli_rejects_missing_tokenizer(tmp_path):
    MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=20)).save_pretrained(tmp_path)
    r = subprocess.run([sys.executable, "-m", "mpt_kernels.generate", "--model", str(tmp_path), "--prompt", "x"],
                       capture_output=True, text=True, timeout=120, env=subprocess_env(),
                       cwd=NEUTRAL_CWD)
    assert r.returncode == 2 and "tokenizer.json" in r.stderr


def test_text_streamer_prints_incrementally(tmp_path):
    _, tok = make_model_dir(tmp_path)

    class Out:
        def __init__(self):
            self.chunks = []

        def write(self, s):
            self.chunks.append(s)

        def flush(self):
            pass

    out = Out()
    s = TextStreamer(tok, out)
    s.put(torch.tensor([[1, 2]]))  # the prompt: not printed
    for w in ("dog", "ran", "on"):
        s.put(torch.tensor([tok.token_to_id(w)]))
    s.end()
    assert "".join(out.chunks).strip() == "dog ran on"
    assert len([c for c in out.chunks if c]) >= 3  # one write per token, not one at the end


def _cli_error(capsys, argv):
    """The CLI in-process, expecting an argparse-style error: exit status 2 and a message, no traceback."""
    from mpt_kernels.generate import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "python -m mpt_kernels.generate: error:" in err and "Traceback" not in err
    return err


def test_cli_missing_model_directory_is_a_clean_error(tmp_path, capsys):
    err = _cli_error(capsys, ["--model", str(tmp_path / "nope"), "--prompt", "the cat"])
    assert "--model:" in err and "nope does not exist" in err


def test_cli_unloadable_checkpoint_is_a_clean_error(tmp_path, capsys):
    make_model_dir(tmp_path)
    os.remove(tmp_path / "config.json")
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu"])
    assert "--model: cannot load" in err and "config.json" in err


def test_cli_cuda_device_without_cuda_is_a_clean_error(tmp_path, capsys):
    import mpt_kernels as mk

    if torch.cuda.is_available() and mk.cuda_available():
        pytest.skip("this machine can run --device cuda")
    make_model_dir(tmp_path)
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cuda"])
    assert "--device cuda" in err and "use --device cpu" in err
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "tpu"])
    assert "--device" in err


def test_cli_tokenizer_vocab_mismatch_is_a_clean_error(tmp_path, capsys):
    _, tok = make_model_dir(tmp_path)
    # A checkpoint whose vocabulary is smaller than the tokenizer's: "it was" encodes to ids 12 and 13.
    MPTForCausalLM(MPTConfig(d_model=64, n_heads=4, n_layers=1, vocab_size=8)).save_pretrained(tmp_path)
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "it was", "--device", "cpu"])
    assert "token id 13" in err and "vocab_size" in err and "tokenizer" in err


def _chat_model_dir(path):
    """A WordLevel tokenizer with ChatML's special tokens and "\\n", and a random model over it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = WORDS + ["user", "assistant", "system", "\n"]
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split("\n", "isolated"), pre_tokenizers.Whitespace()])
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(path, "tokenizer.json"))
    torch.manual_seed(0)
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, vocab_size=tok.get_vocab_size(), max_seq_len=8,
                    attn_config=dict(attn_impl="flash"))
    model = MPTForCausalLM(cfg)
    model.save_pretrained(path)
    return model, tok


def test_cli_chat_keeps_one_cache_across_turns(tmp_path):
    """--chat: each line of stdin is a user turn in ChatML; the answers equal generate() over the whole
    conversation so far, and each turn prefills only its own tokens (plus the last answer's end)."""
    model, tok = _chat_model_dir(tmp_path)
    end = tok.token_to_id("<|im_end|>")
    turns = ["the cat sat", "then the dog ran on the mat"]
    # the expected conversation, built with the Python API, no cache
    history = tok.encode("<|im_start|>system\nit was a log<|im_end|>\n").ids
    answers = []
    for t in turns:
        ids = history + tok.encode(f"<|im_start|>user\n{t}<|im_end|>\n<|im_start|>assistant\n").ids
        out = model.generate(torch.tensor([ids]), 6, temperature=0,
                             eos_token_id=[end, tok.token_to_id("<|endoftext|>")])[0].tolist()
        answers.append(tok.decode(out[len(ids):]))
        history = out + tok.encode(("" if out[-1] == end else "<|im_end|>") + "\n").ids
    r = subprocess.run([sys.executable, "-m", "mpt_kernels.generate", "--model", str(tmp_path), "--chat",
                        "--system", "it was a log", "--max-new-tokens", "6", "--temperature", "0", "--device", "cpu"],
                       input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=120,
                       env=subprocess_env(OMP_NUM_THREADS="1"), cwd=NEUTRAL_CWD)
    assert r.returncode == 0, r.stderr
    assert all(a.strip() for a in answers)  # the random model says something each turn
    assert [line.strip() for line in r.stdout.strip().split("\n")] == [a.strip() for a in answers]
    stats = [line for line in r.stderr.splitlines() if line.startswith("[turn")]
    assert len(stats) == 2
    n1 = int(stats[0].split("prefilled ")[1].split(" of ")[0])
    n2, total2 = (int(x) for x in stats[1].split("prefilled ")[1].split(" tokens")[0].split(" of "))
    assert n1 == int(stats[0].split(" of ")[1].split(" tokens")[0])  # the first turn prefills everything
    assert n2 < total2 and n2 <= len(tok.encode(f"<|im_end|>\n<|im_start|>user\n{turns[1]}<|im_end|>\n"
                                                 "<|im_start|>assistant\n").ids) + 1


def test_cli_chat_encodes_as_training_and_closes_an_end_of_text_turn(tmp_path, monkeypatch, capsys):
    """--chat feeds the model what the ChatML finetune trained on: no post-processor tokens (a
    tokenizer.json that adds a BOS put one in front of every turn, mid-conversation), and a turn the
    model ended with <|endoftext|> is closed by <|im_end|> in its place (training never has
    "<|endoftext|><|im_end|>")."""
    import io

    from tokenizers import processors

    from mpt_kernels import generate as cli

    model, tok = _chat_model_dir(tmp_path)
    bos = tok.token_to_id("then")  # a stand-in BOS that the post-processor adds
    tok.post_processor = processors.TemplateProcessing(single="then $A", special_tokens=[("then", bos)])
    tok.save(os.path.join(tmp_path, "tokenizer.json"))
    assert tok.encode("the cat").ids[0] == bos  # the post-processor is on by default
    start, end, eot = (tok.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>"))
    seen = []

    def fake_generate(self, input_ids, max_new_tokens, **kw):
        seen.append(input_ids[0].tolist())
        return torch.cat([input_ids, torch.tensor([[tok.token_to_id("cat"), eot]])], dim=1)

    monkeypatch.setattr(MPTForCausalLM, "generate", fake_generate)
    monkeypatch.setattr("sys.stdin", io.StringIO("the cat sat\nthe dog\n"))
    assert cli.main(["--model", str(tmp_path), "--chat", "--max-new-tokens", "4", "--device", "cpu"]) == 0
    capsys.readouterr()
    plain = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    first = plain("<|im_start|>user\nthe cat sat<|im_end|>\n<|im_start|>assistant\n")
    assert seen[0] == first
    answer = [tok.token_to_id("cat"), end] + plain("\n")  # the end-of-text replaced by <|im_end|>
    assert seen[1] == first + answer + plain("<|im_start|>user\nthe dog<|im_end|>\n<|im_start|>assistant\n")


def test_cli_chat_needs_chatml_tokens(tmp_path, capsys):
    make_model_dir(tmp_path)
    err = _cli_error(capsys, ["--model", str(tmp_path), "--chat"])
    assert "--chat: the tokenizer has no <|im_start|>" in err
    assert "--prompt is required" in _cli_error(capsys, ["--model", str(tmp_path)])


@pytest.mark.parametrize("flag, value", [("--top-p", "2"), ("--top-k", "-1"), ("--temperature", "nan")])
def test_cli_sampling_flags_are_checked_before_the_prompt_is_printed(tmp_path, capsys, flag, value):
    """A bad sampling flag is refused before the model loads and before the prompt is echoed, naming
    the flag (not generate's argument name)."""
    from mpt_kernels.generate import main

    make_model_dir(tmp_path)
    with pytest.raises(SystemExit) as e:
        main(["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu", flag, value])
    assert e.value.code == 2
    out, err = capsys.readouterr()
    assert f"python -m mpt_kernels.generate: error: {flag}: " in err, err
    assert "top_p:" not in err and "top_k:" not in err and "Traceback" not in err
    assert out == ""  # the prompt was not printed


@pytest.mark.parametrize("seed", [str(2**64), str(-2**63 - 1), "99999999999999999999999"])
def test_cli_seed_out_of_range_is_a_clean_error(tmp_path, capsys, seed):
    """torch takes seeds in [-2**63, 2**64): a larger --seed raised a bare 'Overflow when unpacking long
    long' traceback from torch.manual_seed, after the prompt was printed."""
    make_model_dir(tmp_path)
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu", "--seed", seed])
    assert "--seed:" in err


def test_cli_kv_cache_too_large_is_a_clean_error(tmp_path, capsys):
    """generate reserves the KV cache for prompt + max_new_tokens up front: one that cannot be allocated
    raised the allocator's RuntimeError with a traceback; it is a MemoryError naming the size, and a
    --max-new-tokens error on the command line."""
    model, _ = make_model_dir(tmp_path)
    with pytest.raises(MemoryError, match=r"KVCache: cannot allocate room for .* GiB .*max_new_tokens"):
        model.generate(torch.tensor([[1, 2, 3]]), 10**13)
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu",
                              "--max-new-tokens", str(10**13)])
    assert "KVCache: cannot allocate room" in err


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_cli_truncated_weights_are_a_clean_error(tmp_path, capsys, weights):
    """A weights file cut short (an interrupted download or copy) raised safetensors' SafetensorError
    or torch.load's RuntimeError with a traceback; it is a --model error like a missing config."""
    model, _ = make_model_dir(tmp_path)
    if weights == "pytorch_model.bin":
        os.remove(tmp_path / "model.safetensors")
        torch.save(model.state_dict(), tmp_path / weights)
    data = (tmp_path / weights).read_bytes()
    (tmp_path / weights).write_bytes(data[:len(data) // 2])
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu"])
    assert "--model: cannot load" in err


def test_cli_unreadable_config_is_a_clean_error(tmp_path, capsys):
    """config.json that cannot be opened (here: a directory of that name; a file without read permission
    is the same OSError) raised with a traceback."""
    make_model_dir(tmp_path)
    os.remove(tmp_path / "config.json")
    os.mkdir(tmp_path / "config.json")
    err = _cli_error(capsys, ["--model", str(tmp_path), "--prompt", "the cat", "--device", "cpu"])
    assert "--model: cannot load" in err


def test_cli_output_piped_into_a_reader_that_stops_is_quiet(tmp_path):
    """`python -m mpt_kernels.generate ... | head -c 20`: the reader closing the pipe raised
    BrokenPipeError from the streamer, with a traceback (and 'Exception ignored' at exit)."""
    make_model_dir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mpt_kernels.generate", "--model", str(tmp_path), "--prompt",
                             "the cat", "--max-new-tokens", "50", "--no-eos", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=subprocess_env(OMP_NUM_THREADS="1"),
                            cwd=NEUTRAL_CWD)
    proc.stdout.close()  # the reader is gone before the first word (the child is still importing torch)
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 1, err
    assert "Traceback" not in err and "BrokenPipeError" not in err and "Exception ignored" not in err, err


def test_cli_chat_interrupted_with_ctrl_c_is_quiet(tmp_path):
    """Ctrl-C is how a --chat user leaves; it printed a KeyboardInterrupt traceback. Now: exit status 130."""
    import signal

    _chat_model_dir(tmp_path)
    proc = subprocess.Popen([sys.executable, "-m", "mpt_kernels.generate", "--model", str(tmp_path), "--chat",
                             "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", "0", "--device", "cpu"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=subprocess_env(OMP_NUM_THREADS="1"), cwd=NEUTRAL_CWD,
                            # as in a terminal's foreground: a test run started in the background (`cmd &`)
                            # ignores SIGINT, children inherit that, and Python then installs no handler
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    proc.stdout.readline()  # the first answer: the loop now waits for the next message
    # A SIGINT that lands between the loop's last signal check and its blocking read of stdin is only
    # acted on once the read returns (CPython checks signals between bytecodes): as a user would, press
    # Ctrl-C again until it exits, keeping stdin open (EOF would end the chat normally).
    for _ in range(20):
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            pass
    _, err = proc.communicate(timeout=120)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
