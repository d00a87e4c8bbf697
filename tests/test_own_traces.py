"""Your own traces and your own model: `prepare --format traces/pairs` against the OpenR1 path, the Llama-3 chat
template against transformers, and prepare -> SFT -> REDI -> evaluate on a tiny random Llama-3 model."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

import data as D
import evaluate as E
import model as M
import train as T

# Meta-Llama-3-8B-Instruct's chat template, as its tokenizer_config.json publishes it.
LLAMA3_JINJA = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
# Llama-3's pre-tokenizer split (tiktoken's cl100k pattern).
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
                r"\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = [D.BEGIN_OF_TEXT, D.END_OF_TEXT, D.START_HEADER, D.END_HEADER, D.EOT]
MESSAGES = [
    [{"role": "user", "content": "What is $1+1$?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "  Hi\n\nthere \n"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nA\n</think>\n\n\\boxed{2}\n"}],
]


def llama3_tokenizer(texts: list[str], vocab_size: int = 400) -> Tokenizer:
    """A tiny byte-level BPE built like Llama-3's (its split pattern, byte-level bytes, its special tokens)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=LLAMA3_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_tokenizer(tok: Tokenizer, template: str, bos: str | None) -> transformers.PreTrainedTokenizerFast:
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos)
    hf.chat_template = template
    return hf


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    D.toy_corpus(d, n_train=120, n_test=4, seed=8)
    return d


@pytest.fixture(scope="module")
def llama_dir(toy):
    """A tiny random Llama-3 checkpoint (llama3 RoPE scaling, GQA, tied head) with a Llama-3-style tokenizer."""
    rows = pq.read_table(toy / "raw").to_pylist()
    tok = llama3_tokenizer([r["problem"] for r in rows] + [g for r in rows for g in r["generations"]])
    d = toy / "llama"
    d.mkdir()
    tok.save(str(d / "tokenizer.json"))
    config = M.Qwen2Config(model_type="llama", vocab_size=64 * -(-tok.get_vocab_size() // 64), hidden_size=64,
                           intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           rope_theta=5e5, max_position_embeddings=1024, tie_word_embeddings=True,
                           rope_scaling=dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                             original_max_position_embeddings=256),
                           bos_token_id=tok.token_to_id(D.BEGIN_OF_TEXT), eos_token_id=tok.token_to_id(D.EOT))
    M.save_pretrained(M.build_model(config, seed=0), d / "base", tokenizer_from=d)
    return d / "base"


# -----------------------------------------------------------------------------
# Chat templates


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("gen", [False, True])
def test_llama3_template_is_byte_identical_to_transformers(llama_dir, messages, gen):
    hf = hf_tokenizer(D.load_tokenizer(llama_dir, family="llama"), LLAMA3_JINJA, D.BEGIN_OF_TEXT)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert D.chat_template(messages, add_generation_prompt=gen, family="llama") == expected


@pytest.mark.parametrize("messages", MESSAGES)
@pytest.mark.parametrize("gen", [False, True])
def test_qwen25_template_is_byte_identical_to_transformers(toy, messages, gen):
    from test_data import QWEN25_JINJA
    hf = hf_tokenizer(D.load_tokenizer(toy / "model"), QWEN25_JINJA, None)
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
    assert D.chat_template(messages, add_generation_prompt=gen, family="qwen2") == expected


def test_the_code_holds_the_published_jinja_templates():
    from test_data import QWEN25_JINJA
    assert D.CHAT_JINJA == {"qwen2": QWEN25_JINJA, "llama": LLAMA3_JINJA}


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_saved_checkpoints_carry_the_chat_template_for_transformers(toy, llama_dir, tmp_path, family):
    """AutoTokenizer on what we save formats chats byte for byte as data.py does, and marks our special tokens."""
    source = llama_dir if family == "llama" else toy / "model"
    assert not (source.parent / "tokenizer_config.json").exists()  # the sources come without one
    if family == "qwen2":
        source = tmp_path / "base"
        M.main(["init", "--config", str(toy / "model"), "--out", str(source)])
    M.save_pretrained(M.load_pretrained(source), tmp_path / "saved")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "saved")
    for messages in MESSAGES:
        for gen in (False, True):
            assert hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                D.chat_template(messages, add_generation_prompt=gen, family=family)
    end_turn = D.CHAT_TOKENS[family][1]
    assert hf.eos_token == end_turn and hf.convert_tokens_to_ids(end_turn) in D.stop_ids(D.load_tokenizer(
        tmp_path / "saved", family=family), family)
    own = {"chat_template": "{{ 'theirs' }}", "eos_token": end_turn}
    (tmp_path / "saved" / "tokenizer_config.json").write_text(json.dumps(own))
    M.save_pretrained(M.load_pretrained(tmp_path / "saved"), tmp_path / "again")
    assert json.loads((tmp_path / "again" / "tokenizer_config.json").read_text()) == own  # a template of its own stays


def test_a_dated_llama_template_gets_one_note(llama_dir, tmp_path, capsys):
    import sample as S
    assert D.template_note(llama_dir, "llama") is None
    d = tmp_path / "llama31"
    M.save_pretrained(M.load_pretrained(llama_dir), d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{- bos_token }}{%- set date_string = strftime_now('%d %b %Y') %}" \
                              "{{- 'Cutting Knowledge Date: December 2023' }}"
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    S.main(["--model", str(d), "--prompt", "1+1", "--max-new-tokens", "2"])
    assert capsys.readouterr().out.count("Llama-3.0's header template") == 1


def test_a_tokenizer_that_is_not_the_models_is_refused(toy, tmp_path):
    """A 448-token tokenizer with a model of 151,936 embeddings: its ids beyond the tokenizer decode to nothing."""
    import sample as S
    config = M.Qwen2Config(vocab_size=151_936, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True)
    M.save_pretrained(M.build_model(config), tmp_path / "big", tokenizer_from=toy / "model")
    with pytest.raises(SystemExit, match="tokenizer and model do not belong together"):
        S.main(["--model", str(tmp_path / "big"), "--prompt", "1+1", "--max-new-tokens", "2"])
    with pytest.raises(SystemExit, match="tokenizer and model do not belong together"):
        E.main(["--model", str(tmp_path / "big"), "--benchmarks", str(toy / "test.jsonl"), "--out",
                str(tmp_path / "eval"), "--samples", "1", "--max-new-tokens", "2"])
    assert not (tmp_path / "eval").exists()


def test_family_decides_prompts_stops_and_lengths(llama_dir):
    tok = D.load_tokenizer(llama_dir, family="llama")
    assert D.eval_prompt_text("x", family="llama") == D.prompt_text("x", "llama") + "<think>\n" == \
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nx<|eot_id|>" \
        "<|start_header_id|>assistant<|end_header_id|>\n\n<think>\n"
    assert D.stop_ids(tok, "llama") == [tok.token_to_id(D.EOT), tok.token_to_id(D.END_OF_TEXT)]
    enc = D.ChatEncoder(tok, "llama")
    [prompt] = enc.prompts(["Solve $2x = 4$."])
    n = lambda msgs: len(tok.encode(D.chat_template(msgs, family="llama"), add_special_tokens=False).ids) + 1  # noqa
    for response in ("<think>\nx = 2\n</think>\n\n\\boxed{2}", "  padded \n"):
        [ids] = enc.responses([response])
        assert ids[-1] == tok.token_to_id(D.EOT)
        # the authors' definition: the template on [user] and on [assistant] alone, tokenized, plus one each
        assert enc.authors_lengths(prompt, response, ids) == (
            n([{"role": "user", "content": "Solve $2x = 4$."}]), n([{"role": "assistant", "content": response}]))
    with pytest.raises(D.DataError, match="no chat template for model_type 'qwen3'"):
        D.chat_template(MESSAGES[0], family="qwen3")
    with pytest.raises(D.DataError, match="has no <|im_start|> token"):
        D.load_tokenizer(llama_dir, family="qwen2")


# -----------------------------------------------------------------------------
# prepare --format traces / pairs: the OpenR1 rules on other schemas


def as_traces(rows: list[dict]) -> list[dict]:
    """OpenR1 rows as traces rows, for the rows the generic formats can express (valid, not cn_k12)."""
    out = []
    for r in rows:
        if r["problem_is_valid"] == "Yes" and r["source"] != "cn_k12":
            labels = r["correctness"]
            out.append({"problem": r["problem"], "source": r["source"], "generations": r["generations"],
                        "correct": [a and b for a, b in zip(labels["llama_verification"],
                                                            labels["math_verify_reparsed_answer"])]})
    return out


def assert_same_outputs(a, b, columns):
    for kind in ("sft", "pref"):
        ta, tb = pq.read_table(a / f"{kind}.parquet"), pq.read_table(b / f"{kind}.parquet")
        for c in columns[kind]:
            assert ta.column(c).to_pylist() == tb.column(c).to_pylist(), (kind, c)
        assert (a / f"{kind}.tokens.bin").read_bytes() == (b / f"{kind}.tokens.bin").read_bytes()
        assert np.array_equal(np.load(a / f"{kind}.index.npy"), np.load(b / f"{kind}.index.npy"))


def test_traces_and_pairs_select_what_openr1_selects(toy, tmp_path):
    rows = pq.read_table(toy / "raw").to_pylist()
    for r in rows[:40]:  # a toy's wrong traces are as long as its right ones: give a few a long detour
        labels = r["correctness"]["math_verify_reparsed_answer"]
        r["generations"] = [g.replace("</think>", "Let me check that again.\n" * 5 + "</think>")
                            if i < len(labels) and not labels[i] else g for i, g in enumerate(r["generations"])]
    traces = as_traces(rows)
    openr1 = [r for r in rows if r["problem_is_valid"] == "Yes" and r["source"] != "cn_k12"]
    pq.write_table(pa.Table.from_pylist(openr1), tmp_path / "openr1.parquet")
    (tmp_path / "traces").mkdir()  # a directory holding JSONL and parquet halves
    with open(tmp_path / "traces" / "a.jsonl", "w") as f:
        f.writelines(json.dumps(t) + "\n\n" for t in traces[:50])  # blank lines are skipped
    pq.write_table(pa.Table.from_pylist(traces[50:]), tmp_path / "traces" / "b.parquet")
    cfg = dict(max_prompt_tokens=42, max_response_tokens=76, batch_rows=16, bucket_bytes=4000)
    quiet = lambda *a: None  # noqa: E731
    ref = D.prepare([tmp_path / "openr1.parquet"], toy / "model", tmp_path / "ref", D.PrepareConfig(**cfg), log=quiet)
    got = D.prepare([tmp_path / "traces"], toy / "model", tmp_path / "got",
                    D.PrepareConfig(**cfg, format="traces"), log=quiet)
    assert got == ref and ref.label_mismatch > 0 and ref.no_correct > 0 and ref.prompt_too_long > 0 \
        and ref.chosen_too_long > 0 and ref.rejected_too_long > 0 and ref.pref > 0
    every = {"sft": ["problem", "response", "source", "row", "gen_idx"],
             "pref": ["problem", "chosen", "rejected", "source", "row", "chosen_gen_idx", "rejected_gen_idx"]}
    assert_same_outputs(tmp_path / "ref", tmp_path / "got", every)

    pairs = []  # the same selection, made by the teacher's owner: chosen/rejected, response, or nothing usable
    for t in traces:
        c, g = t["correct"], t["generations"]
        if len(c) != len(g):
            pairs.append({"problem": t["problem"], "source": t["source"], "chosen": None, "rejected": g[0]})
        elif not any(c):
            pairs.append({"problem": t["problem"], "source": t["source"], "response": None})
        elif all(c):
            pairs.append({"problem": t["problem"], "source": t["source"], "response": g[c.index(True)]})
        else:
            pairs.append({"problem": t["problem"], "source": t["source"], "chosen": g[c.index(True)],
                          "rejected": g[c.index(False)]})
    with open(tmp_path / "pairs.jsonl", "w") as f:
        f.writelines(json.dumps(p) + "\n" for p in pairs)
    counts = D.prepare([tmp_path / "pairs.jsonl"], toy / "model", tmp_path / "pairs",
                       D.PrepareConfig(**cfg, format="pairs"), log=quiet)
    # a pair without a chosen response counts as having no correct trace, a row with no response at all as having
    # no generations: here the rows OpenR1 removes for mismatched labels and for having no correct trace
    assert counts == D.Counts(**{**vars(ref), "label_mismatch": 0, "no_correct": ref.label_mismatch,
                                 "no_generations": ref.no_correct})
    text = {"sft": ["problem", "response", "source", "row"], "pref": ["problem", "chosen", "rejected", "source", "row"]}
    assert_same_outputs(tmp_path / "ref", tmp_path / "pairs", text)
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["params"]["format"] == "pairs" and manifest["chat_family"] == "qwen2"


@pytest.mark.parametrize("line, message", [
    ('{"problem": "p", "generations": ["a"], "correct": [true]', r"bad.jsonl:2: not valid JSON"),
    ('["p"]', r"bad.jsonl:2: expected a JSON object"),
    ('{"problem": "p", "generations": ["a"]}', r"bad.jsonl:2: missing field 'correct'"),
    ('{"problem": "p", "generations": "a", "correct": [true]}', r"bad.jsonl:2: field 'generations' must be a list"),
    ('{"problem": "p", "generations": ["a"], "correct": ["yes"]}', r"field 'correct' must be a list of booleans"),
    ('{"problem": 3, "generations": ["a"], "correct": [true]}', r"field 'problem' must be a string"),
])
def test_malformed_trace_rows_are_errors_naming_file_and_line(toy, tmp_path, line, message):
    good = '{"problem": "p", "generations": ["a"], "correct": [true]}'
    (tmp_path / "bad.jsonl").write_text(good + "\n" + line + "\n")
    with pytest.raises(D.DataError, match=message):
        D.prepare([tmp_path / "bad.jsonl"], toy / "model", tmp_path / "out", D.PrepareConfig(format="traces"),
                  log=lambda *a: None)
    assert not (tmp_path / "out").exists()


def test_null_fields_are_counted_like_openr1_nulls(toy, tmp_path):
    rows = [{"problem": None, "generations": ["a"], "correct": [True]},
            {"problem": "p", "generations": None, "correct": [True]},
            {"problem": "p", "generations": ["a", "b"], "correct": [True, None]},  # null label: incorrect
            {"problem": "q", "generations": ["a", "b"], "correct": None}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    counts = D.prepare([tmp_path / "t.jsonl"], toy / "model", tmp_path / "out", D.PrepareConfig(format="traces"),
                       log=lambda *a: None)
    assert (counts.rows, counts.empty_problem, counts.no_generations, counts.label_mismatch) == (4, 1, 1, 1)
    assert (counts.sft, counts.pref) == (1, 1)
    with pytest.raises(D.DataError, match="exactly one of them"):
        (tmp_path / "p.jsonl").write_text('{"problem": "p", "chosen": "a", "response": "b"}\n')
        D.prepare([tmp_path / "p.jsonl"], toy / "model", tmp_path / "p", D.PrepareConfig(format="pairs"))


def test_null_empty_or_non_string_traces_are_counted_malformed_rows(toy, tmp_path):
    """A chosen (or rejected) trace that is null, empty or not a string removes its row, counted, in every
    format; one that is never chosen does not matter."""
    quiet = lambda *a: None  # noqa: E731
    labels = {"llama_verification": [True, False], "math_verify_reparsed_answer": [True, False]}
    raw = [{"problem": f"p{i}", "problem_is_valid": "Yes", "source": "amc", "generations": gens,
            "correctness": labels} for i, gens in enumerate([[None, "b"], ["", "b"], ["a", None], ["a", "b"]])]
    pq.write_table(pa.Table.from_pylist(raw), tmp_path / "raw.parquet")
    counts = D.prepare([tmp_path / "raw.parquet"], toy / "model", tmp_path / "openr1", log=quiet)
    assert (counts.rows, counts.bad_trace, counts.sft, counts.pref) == (4, 3, 1, 1)

    traces = [{"problem": "p", "generations": gens, "correct": [True, False, True]}
              for gens in ([None, "b", "c"], ["", "b", "c"], [5, "b", "c"], ["a", {"x": 1}, "c"], ["a", "b", None])]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in traces))
    counts = D.prepare([tmp_path / "t.jsonl"], toy / "model", tmp_path / "traces", D.PrepareConfig(format="traces"),
                       log=quiet)
    assert (counts.rows, counts.bad_trace, counts.sft, counts.pref) == (5, 4, 1, 1)

    pairs = [{"problem": "p", "chosen": "", "rejected": "b"}, {"problem": "p", "chosen": 3, "rejected": "b"},
             {"problem": "p", "chosen": "a", "rejected": ["b"]}, {"problem": "p", "response": ""},
             {"problem": "p", "chosen": "a", "rejected": "b"}]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    counts = D.prepare([tmp_path / "p.jsonl"], toy / "model", tmp_path / "pairs", D.PrepareConfig(format="pairs"),
                       log=quiet)
    assert (counts.rows, counts.bad_trace, counts.sft, counts.pref) == (5, 4, 1, 1)


# -----------------------------------------------------------------------------
# The whole recipe on a tiny Llama-3


def test_prepare_sft_redi_evaluate_on_a_tiny_llama3(toy, llama_dir, tmp_path):
    traces = as_traces(pq.read_table(toy / "raw").to_pylist())[:40]
    with open(tmp_path / "traces.jsonl", "w") as f:
        f.writelines(json.dumps({k: t[k] for k in ("problem", "generations", "correct")}) + "\n" for t in traces)
    D.main(["prepare", "--format", "traces", "--raw", str(tmp_path / "traces.jsonl"), "--model", str(llama_dir),
            "--out", str(tmp_path / "data")])
    data = D.TokenData(tmp_path / "data", "pref")
    assert data.manifest["chat_family"] == "llama" and len(data) > 8
    tok = D.load_tokenizer(llama_dir, family="llama")
    prompt, response = data.docs(0)[0]
    assert tok.decode(prompt.tolist(), skip_special_tokens=False).startswith(
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n")
    assert response[-1] == tok.token_to_id(D.EOT)

    common = ["--data", str(tmp_path / "data"), "--batch-size", "4", "--max-len", "256", "--max-steps", "2",
              "--save-every", "0", "--log-every", "100"]
    T.main(["--stage", "sft", "--model", str(llama_dir), "--out", str(tmp_path / "sft"), "--lr", "1e-3", *common])
    T.main(["--stage", "redi", "--model", str(tmp_path / "sft" / "final"), "--out", str(tmp_path / "redi"),
            "--lr", "1e-3", *common])
    final = tmp_path / "redi" / "final"
    assert json.loads((final / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(final)  # still a Llama checkpoint transformers loads
    assert type(hf).__name__ == "LlamaForCausalLM" and hf.config.rope_parameters["rope_type"] == "llama3"

    (tmp_path / "bench.jsonl").write_text("".join(json.dumps({"id": str(i), "problem": t["problem"], "answer": "1"})
                                                  + "\n" for i, t in enumerate(traces[:3])))
    E.main(["--model", str(final), "--benchmarks", str(tmp_path / "bench.jsonl"), "--out", str(tmp_path / "eval"),
            "--samples", "2", "--max-new-tokens", "6", "--prompt", "{problem}"])
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert results["benchmarks"]["bench"]["problems"] == 3
