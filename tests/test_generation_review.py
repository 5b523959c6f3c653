"""Review of the inference path: generate, the KV cache, the CLI's streamer, against transformers.

Tolerances: float32 end to end (logits to 1e-4, as tests/test_model.py); tokens compared exactly.
"""
import io

import pytest
import torch

from mpt_kernels.generate import TextStreamer
from mpt_kernels.model import MPTConfig, MPTForCausalLM

ATOL = 1e-4


pytestmark = pytest.mark.usefixtures("one_thread")


def small(**attn):
    return MPTConfig(d_model=96, n_heads=6, n_layers=2, vocab_size=101, max_seq_len=48,
                     attn_config=dict(attn_impl="flash", **attn))


def perturbed(seed=0):
    torch.manual_seed(seed)
    m = MPTForCausalLM(small())
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return m.eval()


def test_prefill_that_raised_leaves_no_stale_padding_in_the_cache():
    """A padded prefill that raises before the cache advances (here: a float32 cache used under bf16
    autocast) used to leave its row starts in the still-empty cache; an unpadded retry then decoded
    each row over a slice of its keys (logits off by ~2)."""
    m = perturbed(10)
    ids = torch.randint(1, 101, (2, 8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    with torch.no_grad():
        full = m(ids).logits
        cache = m.new_cache(2, capacity=16)
        with pytest.raises(ValueError, match="autocast"), torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids[:, :6], attention_mask=mask[:, :6], past_key_values=cache, use_cache=True)
        assert cache.length == 0
        m(ids[:, :6], past_key_values=cache, use_cache=True)  # the retry, without padding
        step = m(ids[:, 6:], past_key_values=cache).logits
    torch.testing.assert_close(step, full[:, 6:], atol=ATOL, rtol=0)


def test_generate_takes_a_1d_mask_with_a_1d_prompt_and_a_list_mask():
    """generate accepts a (length,) prompt and lists; the mask now may take the same forms."""
    m = perturbed(1)
    ids = torch.randint(1, 101, (6,))
    ref = m.generate(ids, 4, temperature=0)
    assert ref.shape == (1, 10)
    assert torch.equal(m.generate(ids, 4, temperature=0, attention_mask=torch.ones(6, dtype=torch.long)), ref)
    assert torch.equal(m.generate(ids[None], 4, temperature=0, attention_mask=[[1] * 6]), ref)
    padded = torch.cat([torch.zeros(2, dtype=torch.long), ids])
    out = m.generate(padded, 4, temperature=0, attention_mask=[0, 0] + [1] * 6)
    assert torch.equal(out[0, 2:], ref[0])


def test_sampling_equals_transformers_under_the_same_global_seed(tmp_path):
    """temperature / top_k / top_p mean what transformers' warpers mean (temperature, then top-k, then
    top-p, then one multinomial draw per step): with the same global seed the sampled tokens are equal,
    left padding and EOS included."""
    transformers = pytest.importorskip("transformers")
    m = perturbed(2)
    m.save_pretrained(tmp_path)
    hf = transformers.MptForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.randint(1, 101, (3, 7))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    eos = int(m.generate(ids, 3, temperature=0, attention_mask=mask)[0, -1])
    for kw in (dict(temperature=0.7), dict(temperature=1.3, top_k=10), dict(temperature=0.9, top_k=20, top_p=0.9)):
        torch.manual_seed(123)
        ours = m.generate(ids, 16, attention_mask=mask, eos_token_id=eos, pad_token_id=0, **kw)
        torch.manual_seed(123)
        theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, eos_token_id=eos,
                             pad_token_id=0, temperature=kw["temperature"], top_k=kw.get("top_k", 0),
                             top_p=kw.get("top_p", 1.0))
        assert torch.equal(ours, theirs), kw


# ---------------------------------------------------------------------------------------------------
# the CLI's TextStreamer
# ---------------------------------------------------------------------------------------------------
def _word_tokenizer(kind):
    pytest.importorskip("tokenizers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    words = "the cat sat on dog ran mat".split()
    if kind == "wordpiece":  # decoder joins words with spaces, no space before the first
        tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.WordPiece(prefix="##")
    elif kind == "metaspace":  # SentencePiece style: "▁word", the first one's space dropped on decode
        tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{"\u2581" + w: i + 1 for i, w in enumerate(words)}},
                                         unk_token="[UNK]"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:  # byte-level BPE (GPT-NeoX, MPT's own tokenizer): the space is part of the token
        from tokenizers import trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["the cat sat on the mat", "the dog ran on the mat"] * 20, trainer)
    return tok


@pytest.mark.parametrize("kind", ["wordpiece", "metaspace", "bytelevel"])
def test_text_streamer_keeps_the_space_between_prompt_and_generated_text(kind):
    """The streamer decoded the generated ids on their own: with a decoder that drops the first word's
    leading space the CLI printed 'the cat sat onthe dog' for prompt 'the cat sat on'. What it prints
    after the prompt now is what the generated ids add to the prompt's decoded text."""
    tok = _word_tokenizer(kind)
    prompt, generated = "the cat sat on", " the dog ran"
    full = tok.encode(prompt + generated).ids
    n_prompt = len(tok.encode(prompt).ids)
    assert tok.decode(full[:n_prompt]) == prompt
    out = io.StringIO()
    s = TextStreamer(tok, out)
    s.put(torch.tensor([full[:n_prompt]]))
    for t in full[n_prompt:]:
        s.put(torch.tensor([t]))
    s.end()
    assert prompt + out.getvalue() == tok.decode(full) + "\n"
    assert s.n_tokens == len(full) - n_prompt


@pytest.mark.parametrize("kind", ["wordpiece", "metaspace", "bytelevel"])
def test_text_streamer_long_generation_decodes_a_bounded_window(kind):
    """Each token decoded the whole generation so far: O(n^2) over a long generation (80k tokens:
    ~3e9 ids decoded). The window now moves on once printed; the text printed is unchanged, multi-byte
    characters split across tokens (and across window boundaries) included."""
    if kind == "bytelevel":
        pytest.importorskip("tokenizers")
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=280, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["the cat sat on the mat", "the dog ran"] * 20, trainer)
        # untrained characters: é and 🙂 come out as 2 and 4 byte tokens, split across put() calls
        words = ["the", "cat", "café", "🙂", "sat", "on", "mat", "dog", "ran"]
    else:
        tok = _word_tokenizer(kind)
        words = "the cat sat on dog ran mat".split()
    g = torch.Generator().manual_seed(0)
    prompt = "the cat sat on"
    generated = " " + " ".join(words[i] for i in torch.randint(0, len(words), (400,), generator=g).tolist())
    full = tok.encode(prompt + generated).ids
    n_prompt = len(tok.encode(prompt).ids)
    assert tok.decode(full[:n_prompt]) == prompt and len(full) - n_prompt > 3 * TextStreamer.WINDOW

    decoded = []

    class Counting:  # the tokenizer, counting the ids each decode() is given
        def decode(self, ids):
            decoded.append(len(ids))
            return tok.decode(ids)

    out = io.StringIO()
    s = TextStreamer(Counting(), out)
    s.put(torch.tensor([full[:n_prompt]]))
    for t in full[n_prompt:]:
        s.put(torch.tensor([t]))
    s.end()
    assert prompt + out.getvalue() == tok.decode(full) + "\n"
    assert max(decoded) <= TextStreamer.CONTEXT + TextStreamer.WINDOW + 8  # 8: a pending multi-byte tail


# ---------------------------------------------------------------------------------------------------
# generate(past_key_values=...): continuing from a cache
# ---------------------------------------------------------------------------------------------------
def test_generate_continues_from_a_cache_like_a_fresh_prefill():
    """A chat turn: generate with a cache, append the next turn to the returned ids, generate again
    with the same cache. Only the new positions are prefilled; the tokens equal a fresh generate over
    the whole conversation, and the cache then holds every returned position but the last."""
    m = perturbed(3)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(1, 101, (2, 7), generator=g)
    cache = m.new_cache(2)
    first = m.generate(prompt, 5, temperature=0, past_key_values=cache)
    assert torch.equal(first, m.generate(prompt, 5, temperature=0))
    assert len(cache) == first.shape[1] - 1
    turn = torch.cat([first, torch.randint(1, 101, (2, 4), generator=g)], dim=1)
    calls = []
    forward = m._forward

    def recording(input_ids, *args):
        calls.append(input_ids.shape[1])
        return forward(input_ids, *args)

    m._forward = recording
    try:
        second = m.generate(turn, 6, temperature=0, past_key_values=cache)
    finally:
        del m._forward
    assert calls[0] == turn.shape[1] - (first.shape[1] - 1)  # the prefill: the last token + the new turn
    assert torch.equal(second, m.generate(turn, 6, temperature=0))
    assert len(cache) == second.shape[1] - 1
    # and the cache's contents are those of a fresh prefill of the same ids
    with torch.no_grad():
        ref = m(second[:, :-1], use_cache=True).past_key_values
    for layer in range(m.config.n_layers):
        torch.testing.assert_close(cache.k[layer][:, :len(cache)], ref.k[layer][:, :len(ref)], atol=ATOL, rtol=0)
        torch.testing.assert_close(cache.v[layer][:, :len(cache)], ref.v[layer][:, :len(ref)], atol=ATOL, rtol=0)


def test_generate_continues_a_left_padded_batch_from_its_cache():
    """Left padding set by the first call stays with the cache; the mask given later covers the whole
    sequence and must agree with it."""
    m = perturbed(4)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(1, 101, (2, 8), generator=g)
    mask = torch.ones_like(prompt)
    mask[1, :3] = 0
    cache = m.new_cache(2)
    first = m.generate(prompt, 4, temperature=0, attention_mask=mask, past_key_values=cache)
    turn = torch.cat([first, torch.randint(1, 101, (2, 3), generator=g)], dim=1)
    turn_mask = torch.cat([mask, torch.ones(2, turn.shape[1] - 8, dtype=mask.dtype)], dim=1)
    bad = turn_mask.clone()
    bad[1, :3] = 1  # padding the cache was not filled with
    with pytest.raises(ValueError, match="padding the cache"):
        m.generate(turn, 2, temperature=0, attention_mask=bad, past_key_values=cache)
    assert len(cache) == first.shape[1] - 1  # the refused call left it as it was
    second = m.generate(turn, 5, temperature=0, attention_mask=turn_mask, past_key_values=cache)
    assert torch.equal(second, m.generate(turn, 5, temperature=0, attention_mask=turn_mask))


def test_generate_with_a_cache_that_does_not_fit_is_a_clear_error():
    m = perturbed(5)
    ids = torch.randint(1, 101, (2, 6))
    with pytest.raises(ValueError, match="expected a KVCache"):
        m.generate(ids, 2, past_key_values=[])
    with pytest.raises(ValueError, match="holds 3 rows"):
        m.generate(ids, 2, past_key_values=m.new_cache(3))
    other = MPTForCausalLM(MPTConfig(d_model=96, n_heads=6, n_layers=3, vocab_size=101, max_seq_len=48))
    with pytest.raises(ValueError, match="does not fit this model"):
        m.generate(ids, 2, past_key_values=other.new_cache(2))
    cache = m.new_cache(2)
    m.generate(ids, 3, temperature=0, past_key_values=cache)
    with pytest.raises(ValueError, match="at least one token"):
        m.generate(ids, 2, past_key_values=cache)  # the cache already covers more than these ids
    assert len(cache) == 8  # unchanged by the refused calls


def test_finished_rows_are_padded_with_the_first_eos_by_default():
    """Without pad_token_id, a row that stopped on any of the EOS ids is filled with the first EOS id
    (and fed it, as transformers does); the other row's tokens are those of its own greedy generation."""
    m = perturbed(4)
    ids = torch.randint(1, 101, (2, 6))
    greedy = m.generate(ids, 8, temperature=0)
    stop = int(greedy[0, 6])  # row 0 stops at its first new token
    pad = next(t for t in range(1, 101) if t not in greedy.tolist()[0] + greedy.tolist()[1])  # never generated
    out = m.generate(ids, 8, temperature=0, eos_token_id=[pad, stop])
    ends = []
    for r in range(2):
        hit = (greedy[r, 6:] == stop).nonzero()
        end = 6 + int(hit[0]) + 1 if len(hit) else 14
        ends.append(end)
        assert torch.equal(out[r, :end], greedy[r, :end]), r
        assert bool((out[r, end:] == pad).all()), (r, out[r].tolist(), pad)
    assert out.shape[1] == max(ends) and ends[0] == 7
