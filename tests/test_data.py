"""data.py: the paper's selection rules, the chat template, tokenization, the loaders and the toy corpus."""

import gzip
import json
import re
import shutil

import jinja2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

import data as D
import model as M
from conftest import FIXTURES


@pytest.fixture(scope="session")
def qwen_dir(tmp_path_factory):
    """The real Qwen2.5-Math-1.5B config and tokenizer (no weights)."""
    d = tmp_path_factory.mktemp("qwen")
    shutil.copy(FIXTURES / "qwen2.5-math-1.5b" / "config.json", d / "config.json")
    (d / "tokenizer.json").write_bytes(gzip.decompress((FIXTURES / "qwen2.5-math-1.5b" / "tokenizer.json.gz").read_bytes()))
    return d


@pytest.fixture(scope="session")
def qwen_tok(qwen_dir):
    return D.load_tokenizer(qwen_dir)


@pytest.fixture(scope="session")
def toy(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy")
    D.toy_corpus(d, n_train=300, n_test=20, seed=3)
    return d


# -----------------------------------------------------------------------------
# Chat template

# Qwen2.5's chat template (system/user/assistant branch), as its tokenizer_config.json holds it.
QWEN25_JINJA = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nPlease reason step by step, and put your final answer within \\\\boxed{}.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant') %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


@pytest.mark.parametrize("messages", [
    [{"role": "user", "content": "What is $1+1$?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi\n\nthere "}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "<think>\nA\n</think>\n\n\\boxed{2}"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
     {"role": "user", "content": "c"}, {"role": "system", "content": "late system"}],
])
@pytest.mark.parametrize("gen", [False, True])
def test_chat_template_is_byte_identical_to_jinja(messages, gen):
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    expected = env.from_string(QWEN25_JINJA).render(messages=messages, add_generation_prompt=gen)
    assert D.chat_template(messages, add_generation_prompt=gen) == expected


def test_chat_template_token_ids_with_the_real_tokenizer(qwen_tok):
    ids = qwen_tok.encode(D.prompt_text("What is $1+1$?"), add_special_tokens=False).ids
    assert ids[:3] == [151644, 8948, 198]  # <|im_start|> system \n
    assert ids[-3:] == [151644, 77091, 198]  # <|im_start|> assistant \n
    assert ids.count(151645) == 2  # <|im_end|> closes the system and the user turns
    evaluation = qwen_tok.encode(D.eval_prompt_text("x"), add_special_tokens=False).ids
    assert evaluation[-5:] == [151644, 77091, 13708, 766, 397]  # <|im_start|> assistant <th ink >\n
    as_trained = qwen_tok.encode(D.eval_prompt_text("x", style="train"), add_special_tokens=False).ids
    assert as_trained == qwen_tok.encode(D.prompt_text("x") + "<think>\n", add_special_tokens=False).ids
    enc = D.ChatEncoder(qwen_tok)
    assert enc.responses(["<think>\nok"])[0] == [13708, 766, 397, 562, 151645]


def test_authors_length_rule_matches_direct_tokenization(qwen_tok):
    """The 800 / 19,000-token rules count as the authors' script did: the chat template applied to [user] and
    to [assistant] alone, tokenized, plus one. Our arithmetic shortcut must agree, whitespace starts included."""
    enc = D.ChatEncoder(qwen_tok)
    problems = ["Find $x$.", "  leading spaces\n", "数学 problem with ünïcödé"]
    responses = ["<think>\nA</think>\\boxed{1}", "\n\nstarts with newlines", "  two spaces", "\tTab", "x",
                 "’quote", "e\u0301 combining", "\u3000ideographic space"]
    for p in problems:
        prompt_ids = enc.prompts([p])[0]
        for r in responses:
            ours = enc.authors_lengths(prompt_ids, r, enc.responses([r])[0])
            direct = lambda msgs: len(qwen_tok.encode(D.chat_template(msgs), add_special_tokens=False).ids) + 1  # noqa
            assert ours == (direct([{"role": "user", "content": p}]),
                            direct([{"role": "assistant", "content": r}])), (p, r)


# -----------------------------------------------------------------------------
# Selection rules on synthetic raw files

T, F_ = True, False


def raw_rows():
    """Rows exercising every rule, with the number of D_SFT / D_Pref rows each should give."""
    g = lambda n: [f"<think>\ntrace {i}\n</think>\n\\boxed{{{i}}}" for i in range(n)]  # noqa: E731
    return [  # (problem, valid, source, generations, llama, math_verify)
        ("p0", "Yes", "amc", g(3), [F_, T, T], [T, T, F_]),  # correct = [F, T, F]: sft 1, pref 0 (first incorrect)
        ("p1", "yes ", "olympiads", g(2), [T, T], [T, T]),  # all correct: sft, not pref
        ("p2", "No", "amc", g(2), [T, F_], [T, F_]),  # invalid problem
        ("p3", None, "amc", g(2), [T, F_], [T, F_]),  # null validity
        ("p4", "Yes", "cn_k12", g(2), [T, F_], [T, F_]),  # dropped source
        ("", "Yes", "amc", g(2), [T, F_], [T, F_]),  # empty problem
        ("p6", "Yes", "amc", [], [], []),  # no generations
        ("p7", "Yes", "amc", g(3), [T, F_], [T, F_, F_]),  # label list shorter
        ("p8", "Yes", "amc", g(2), None, [T, F_]),  # missing label list
        ("p9", "Yes", "amc", g(2), [F_, F_], [T, T]),  # nothing correct
        ("p10", "Yes", None, g(4), [None, T, T, F_], [T, T, None, T]),  # null labels are false: correct = [F,T,F,F]
        ("p11", "YES", "aops_forum", g(2), [T, T], [F_, T]),  # correct = [F, T]
    ]


def write_raw(path, rows, layout):
    cols = {"problem": [r[0] for r in rows], "problem_is_valid": [r[1] for r in rows],
            "source": [r[2] for r in rows], "generations": [r[3] for r in rows]}
    if layout == "struct":
        cols["correctness"] = [None if r[4] is None else {"llama_verification": r[4],
                                                          "math_verify_reparsed_answer": r[5],
                                                          "math_verify_answer": r[5]} for r in rows]
    else:
        cols["correctness_llama"] = [r[4] for r in rows]
        cols["correctness_math_verify"] = [r[5] for r in rows]
    cols["extra_column"] = list(range(len(rows)))
    pq.write_table(pa.table(cols), path)


@pytest.mark.parametrize("layout", ["struct", "flat"])
def test_selection_rules_exact_counts(tmp_path, toy, layout):
    rows = raw_rows()
    write_raw(tmp_path / "a.parquet", rows[:5], layout)
    write_raw(tmp_path / "b.parquet", rows[5:], layout)  # rows are numbered across files in sorted order
    counts = D.prepare([tmp_path], toy / "model", tmp_path / "out",
                       D.PrepareConfig(batch_rows=2, bucket_bytes=64), log=lambda *a: None)
    assert (counts.rows, counts.invalid_problem, counts.source_cn_k12, counts.empty_problem,
            counts.no_generations, counts.label_mismatch, counts.no_correct) == (12, 2, 1, 1, 1, 2, 1)
    assert (counts.sft, counts.no_incorrect, counts.pref_candidates, counts.pref) == (4, 1, 3, 3)

    sft = pq.read_table(tmp_path / "out" / "sft.parquet").to_pylist()
    pref = pq.read_table(tmp_path / "out" / "pref.parquet").to_pylist()
    picked = {r["problem"]: r["gen_idx"] for r in sft}
    assert picked == {"p0": 1, "p1": 0, "p10": 1, "p11": 1}  # the first trace both verifiers accept
    assert {r["problem"]: (r["chosen_gen_idx"], r["rejected_gen_idx"]) for r in pref} == \
        {"p0": (1, 0), "p10": (1, 0), "p11": (1, 0)}
    assert all(r["response"] == rows[r["row"]][3][r["gen_idx"]] for r in sft)
    assert all(r["rejected"] == rows[r["row"]][3][r["rejected_gen_idx"]] for r in pref)
    assert {r["source"] for r in sft} == {"amc", "olympiads", None, "aops_forum"}


def test_output_order_is_the_seed_42_shuffle(tmp_path, toy):
    """Outputs follow `datasets.shuffle(seed=42)` of the raw rows: np.random.default_rng(42).permutation."""
    rows = [(f"q{i}", "Yes", "amc", ["a", "b"], [T, F_], [T, F_]) for i in range(50)]
    write_raw(tmp_path / "raw.parquet", rows, "struct")
    D.prepare([tmp_path / "raw.parquet"], toy / "model", tmp_path / "out",
              D.PrepareConfig(batch_rows=7, bucket_bytes=100), log=lambda *a: None)
    order = np.random.default_rng(42).permutation(50).tolist()
    assert pq.read_table(tmp_path / "out" / "sft.parquet")["row"].to_pylist() == order
    assert pq.read_table(tmp_path / "out" / "pref.parquet")["row"].to_pylist() == order
    D.prepare([tmp_path / "raw.parquet"], toy / "model", tmp_path / "out7", D.PrepareConfig(seed=7),
              log=lambda *a: None)
    assert pq.read_table(tmp_path / "out7" / "sft.parquet")["row"].to_pylist() == \
        np.random.default_rng(7).permutation(50).tolist()


def test_buckets_do_not_change_the_result(tmp_path, toy):
    one = D.prepare([toy / "raw"], toy / "model", tmp_path / "one", log=lambda *a: None)
    many = D.prepare([toy / "raw"], toy / "model", tmp_path / "many",
                     D.PrepareConfig(batch_rows=5, bucket_bytes=2000, tokenize_rows=7), log=lambda *a: None)
    assert one == many
    for name in ("sft.parquet", "pref.parquet"):  # row groups differ with the chunking; the rows may not
        assert pq.read_table(tmp_path / "one" / name).equals(pq.read_table(tmp_path / "many" / name)), name
    for name in ("sft.tokens.bin", "pref.tokens.bin"):
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "many" / name).read_bytes(), name
    for name in ("sft.index.npy", "pref.index.npy"):
        assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "many" / name))


def test_length_filters(tmp_path, qwen_dir, qwen_tok):
    """Each length rule removes exactly the triplets over its limit, counted as the authors counted."""
    rng = np.random.default_rng(0)
    words = lambda n: " ".join(rng.choice(["alpha", "beta", "7", "+", "\\frac{1}{2}", "x"], size=n))  # noqa
    rows = [(words(int(rng.integers(5, 60))), "Yes", "amc", [words(int(rng.integers(5, 120))),
             words(int(rng.integers(5, 120)))], [T, F_], [T, F_]) for _ in range(60)]
    write_raw(tmp_path / "raw.parquet", rows, "flat")
    cfg = D.PrepareConfig(max_prompt_tokens=70, max_response_tokens=150)
    counts = D.prepare([tmp_path / "raw.parquet"], qwen_dir, tmp_path / "out", cfg, log=lambda *a: None)

    direct = lambda msgs: len(qwen_tok.encode(D.chat_template(msgs), add_special_tokens=False).ids) + 1  # noqa
    expect = {"prompt": 0, "chosen": 0, "rejected": 0, "kept": []}
    for i, (p, _, _, (c, r), _, _) in enumerate(rows):
        if direct([{"role": "user", "content": p}]) > 70:
            expect["prompt"] += 1
        elif direct([{"role": "assistant", "content": c}]) > 150:
            expect["chosen"] += 1
        elif direct([{"role": "assistant", "content": r}]) > 150:
            expect["rejected"] += 1
        else:
            expect["kept"].append(i)
    assert min(expect["prompt"], expect["chosen"], expect["rejected"]) > 0  # every rule is exercised
    assert (counts.prompt_too_long, counts.chosen_too_long, counts.rejected_too_long) == \
        (expect["prompt"], expect["chosen"], expect["rejected"])
    assert sorted(pq.read_table(tmp_path / "out" / "pref.parquet")["row"].to_pylist()) == expect["kept"]
    assert counts.sft == 60  # D_SFT has no length rule


def test_tokens_match_the_text(toy, tmp_path):
    D.prepare([toy / "raw"], toy / "model", tmp_path / "out", log=lambda *a: None)
    tok = D.load_tokenizer(toy / "model")
    for kind in ("sft", "pref"):
        data = D.TokenData(tmp_path / "out", kind)
        table = pq.read_table(tmp_path / "out" / f"{kind}.parquet").to_pylist()
        assert len(data) == len(table) > 0
        for i in (0, len(data) // 2, len(data) - 1):
            docs = data.docs(i)
            responses = [table[i]["response"]] if kind == "sft" else [table[i]["chosen"], table[i]["rejected"]]
            for (prompt, response), text in zip(docs, responses):
                assert tok.decode(prompt.tolist(), skip_special_tokens=False) == D.prompt_text(table[i]["problem"])
                assert tok.decode(response.tolist(), skip_special_tokens=False) == text + D.IM_END


# -----------------------------------------------------------------------------
# Bad input


def test_bad_files_name_the_file_and_column(tmp_path, toy):
    prep = lambda p: D.prepare([p], toy / "model", tmp_path / "out", log=lambda *a: None)  # noqa: E731
    rows = raw_rows()[:2]
    write_raw(tmp_path / "ok.parquet", rows, "struct")
    table = pq.read_table(tmp_path / "ok.parquet")

    pq.write_table(table.drop_columns(["source"]), tmp_path / "nosource.parquet")
    with pytest.raises(D.DataError, match=r"nosource.parquet: missing column 'source'"):
        prep(tmp_path / "nosource.parquet")
    pq.write_table(table.set_column(3, "generations", pa.array(["x", "y"])), tmp_path / "gens.parquet")
    with pytest.raises(D.DataError, match=r"gens.parquet: column 'generations' has type string, expected list<string>"):
        prep(tmp_path / "gens.parquet")
    pq.write_table(table.drop_columns(["correctness"]), tmp_path / "nolabels.parquet")
    with pytest.raises(D.DataError, match=r"nolabels.parquet: missing column 'correctness'"):
        prep(tmp_path / "nolabels.parquet")
    bad_struct = pa.array([{"llama_verification": [True]}] * 2)
    pq.write_table(table.set_column(table.schema.get_field_index("correctness"), "correctness", bad_struct),
                   tmp_path / "field.parquet")
    with pytest.raises(D.DataError, match=r"field.parquet: column 'correctness' has no field 'math_verify_reparsed_answer'"):
        prep(tmp_path / "field.parquet")
    flat = pa.table({**{k: table[k] for k in ("problem", "problem_is_valid", "source", "generations")},
                     "correctness_llama": pa.array([["True"], ["False"]]), "correctness_math_verify": [[True], [True]]})
    pq.write_table(flat, tmp_path / "strlabels.parquet")
    with pytest.raises(D.DataError, match=r"strlabels.parquet: column 'correctness_llama' has type list<element: string>"):
        prep(tmp_path / "strlabels.parquet")
    (tmp_path / "garbage.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(D.DataError, match=r"garbage.parquet: not a readable parquet file"):
        prep(tmp_path / "garbage.parquet")
    with pytest.raises(D.DataError, match=r"nowhere: no such file or directory"):
        prep(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(D.DataError, match=r"empty: no .parquet files"):
        prep(tmp_path / "empty")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary left behind


def test_refuses_to_replace_an_unrelated_directory(tmp_path, toy):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(M.CheckpointError, match="mine: exists and is not a directory we wrote"):
        D.prepare([toy / "raw"], toy / "model", tmp_path / "mine", log=lambda *a: None)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_tokenizer_that_does_not_match_the_model(tmp_path, toy, qwen_dir):
    write_raw(tmp_path / "raw.parquet", raw_rows()[:2], "struct")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(toy / "model" / "config.json", mixed / "config.json")
    shutil.copy(qwen_dir / "tokenizer.json", mixed / "tokenizer.json")  # 151,665 tokens
    rows = M.Qwen2Config.from_pretrained(mixed).vocab_size
    with pytest.raises(D.DataError, match=rf"151,665 tokens \(added ones included\) but the model's embedding has {rows} rows"):
        D.prepare([tmp_path / "raw.parquet"], mixed, tmp_path / "out")
    (mixed / "tokenizer.json").write_text("{}")
    with pytest.raises(D.DataError, match="not a valid tokenizers file"):
        D.prepare([tmp_path / "raw.parquet"], mixed, tmp_path / "out")


def test_cli_reports_errors_without_a_traceback(tmp_path, toy, capsys):
    with pytest.raises(SystemExit, match=r"error: .*nowhere: no such file or directory"):
        D.main(["prepare", "--raw", str(tmp_path / "nowhere"), "--model", str(toy / "model"), "--out", str(tmp_path)])


def test_rerun_reuses_and_detects_changes(tmp_path, toy):
    logs = []
    raw = tmp_path / "raw.parquet"
    shutil.copy(toy / "raw" / "train-00000-of-00001.parquet", raw)
    first = D.prepare([raw], toy / "model", tmp_path / "out", log=logs.append)
    mtime = (tmp_path / "out" / "sft.tokens.bin").stat().st_mtime_ns
    assert D.prepare([raw], toy / "model", tmp_path / "out", log=logs.append) == first
    assert any("up to date" in line for line in logs)
    assert (tmp_path / "out" / "sft.tokens.bin").stat().st_mtime_ns == mtime

    table = pq.read_table(raw)
    pq.write_table(table.slice(0, table.num_rows - 1), raw)  # the input changed
    logs.clear()
    second = D.prepare([raw], toy / "model", tmp_path / "out", log=logs.append)
    assert any("changed" in line for line in logs) and second.rows == first.rows - 1
    logs.clear()
    D.prepare([raw], toy / "model", tmp_path / "out", D.PrepareConfig(max_prompt_tokens=50), log=logs.append)
    assert any("changed" in line for line in logs)


def test_truncated_token_file_is_detected(tmp_path, toy):
    D.prepare([toy / "raw"], toy / "model", tmp_path / "out", log=lambda *a: None)
    path = tmp_path / "out" / "sft.tokens.bin"
    path.write_bytes(path.read_bytes()[:-8])
    with pytest.raises(D.DataError, match="sft.tokens.bin: has .* tokens, the manifest says"):
        D.TokenData(tmp_path / "out", "sft")
    with pytest.raises(D.DataError, match="not a complete prepared directory"):
        D.TokenData(tmp_path / "nothing", "sft")


def test_check_tokenizer(tmp_path, toy, qwen_dir):
    D.prepare([toy / "raw"], toy / "model", tmp_path / "out", log=lambda *a: None)
    data = D.TokenData(tmp_path / "out", "sft")
    data.check_tokenizer(toy / "model")
    with pytest.raises(D.DataError, match="is not the tokenizer this data was prepared with"):
        data.check_tokenizer(qwen_dir)


# -----------------------------------------------------------------------------
# Loaders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, toy):
    out = tmp_path_factory.mktemp("prepared") / "out"
    D.prepare([toy / "raw"], toy / "model", out, log=lambda *a: None)
    return out


@pytest.mark.parametrize("kind", ["sft", "pref"])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_every_example_once_per_epoch(prepared, kind, world):
    data = D.TokenData(prepared, kind)
    loaders = [D.Loader(data, batch_size=16, max_tokens=400, max_len=200, world_size=world, rank=r, seed=5)
               for r in range(world)]
    for epoch in (0, 1):
        seen = []
        for step in range(len(loaders[0])):
            per_rank = [ld.micro_batches(epoch, step) for ld in loaders]
            assert len({len(mbs) for mbs in per_rank}) == 1  # same number of forwards on every rank
            step_seen = [int(e) for mbs in per_rank for mb in mbs for e in mb.example_ids]
            step_seen = step_seen[::data.n_docs]  # a triplet is two sequences of the same example
            assert len(step_seen) == len(loaders[0].step_examples(epoch, step))
            for mbs in per_rank:
                for mb in mbs:
                    assert mb.input_ids.shape[1] <= 400
            seen += step_seen
        assert sorted(seen) == list(range(len(data)))
        if epoch == 0:
            first = seen
    assert seen != first  # a new order each epoch


def test_plan_is_deterministic_and_resumable(prepared):
    data = D.TokenData(prepared, "pref")
    a = D.Loader(data, batch_size=8, max_tokens=300, max_len=150, world_size=2, rank=1, seed=1)
    b = D.Loader(data, batch_size=8, max_tokens=300, max_len=150, world_size=2, rank=1, seed=1)
    for epoch, step in ((0, 0), (0, 7), (2, 3)):
        for x, y in zip(a.micro_batches(epoch, step), b.micro_batches(epoch, step)):
            assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.loss_index, y.loss_index)
    c = D.Loader(data, batch_size=8, max_tokens=300, max_len=150, world_size=2, rank=1, seed=2)
    assert not np.array_equal(a.step_examples(0, 0), c.step_examples(0, 0))


def test_step_counts_and_layout(prepared):
    data = D.TokenData(prepared, "pref")
    loaders = [D.Loader(data, batch_size=8, max_tokens=300, max_len=150, world_size=2, rank=r) for r in range(2)]
    n_examples, n_loss = loaders[0].step_counts(0, 3)
    mbs = [mb for ld in loaders for mb in ld.micro_batches(0, 3)]
    assert n_examples == 8 == sum(mb.n_seqs for mb in mbs) // 2
    assert n_loss == sum(len(mb.loss_index) for mb in mbs)
    for mb in mbs:
        for s in range(0, mb.n_seqs, 2):  # chosen, rejected of the same triplet, side by side
            assert mb.example_ids[s] == mb.example_ids[s + 1]
            (_, chosen), (_, rejected) = data.docs(int(mb.example_ids[s]))
            assert mb.loss_target[mb.loss_seq == s].tolist() == chosen.tolist()
            assert mb.loss_target[mb.loss_seq == s + 1].tolist() == rejected.tolist()


def test_packed_forward_equals_per_example_forwards(prepared, toy):
    """Position ids restart per document, so the packed row gives each loss token the log-prob it has when
    its example runs alone."""
    data = D.TokenData(prepared, "pref")
    config = M.Qwen2Config.from_pretrained(toy / "model")
    model = M.build_model(config, seed=0)
    loader = D.Loader(data, batch_size=6, max_tokens=2000, max_len=200)
    (mb,) = loader.micro_batches(0, 0)
    assert mb.n_seqs == 12 and len(mb.loss_index) > 0
    with torch.no_grad():
        hidden = model(mb.input_ids, position_ids=mb.position_ids, return_hidden=True)[0]
        packed = F.log_softmax(model.lm_head(hidden[mb.loss_index]), -1).gather(1, mb.loss_target[:, None])[:, 0]
        for s in range(mb.n_seqs):
            prompt, response = data.docs(int(mb.example_ids[s]))[s % 2]
            ids = torch.from_numpy(np.concatenate([prompt, response]).astype(np.int64))[None]
            logp = F.log_softmax(model(ids)[0, len(prompt) - 1:-1], -1).gather(1, ids[0, len(prompt):, None])[:, 0]
            torch.testing.assert_close(packed[mb.loss_seq == s], logp, rtol=1e-5, atol=1e-5)


def test_too_long_examples_are_dropped_or_truncated(prepared):
    data = D.TokenData(prepared, "sft")
    lengths = data.doc_lengths()[:, 0]
    limit = int(np.median(lengths))
    drop = D.Loader(data, batch_size=4, max_tokens=limit, max_len=limit)
    assert drop.dropped == int((lengths > limit).sum()) > 0
    assert all(lengths[e] <= limit for e in drop.examples)
    cut = D.Loader(data, batch_size=4, max_tokens=limit, max_len=limit, truncate=True)
    assert cut.dropped == 0 and cut.truncated == drop.dropped
    for mb in cut.micro_batches(0, 0):
        assert mb.input_ids.shape[1] <= limit
    with pytest.raises(ValueError, match="cannot hold an example"):
        D.Loader(D.TokenData(prepared, "pref"), batch_size=4, max_tokens=100, max_len=100)


def test_empty_micro_batches_pad_ranks():
    class Tiny:  # two examples, three ranks: one rank has nothing to do this step
        n_docs = 1
        index = np.array([[0, 2, 3], [5, 2, 2]])
        tokens = np.arange(9, dtype=np.uint32)
        manifest = {"eos_id": 99}

        def __len__(self):
            return 2

        doc_lengths = D.TokenData.doc_lengths
        docs = D.TokenData.docs

    loaders = [D.Loader(Tiny(), batch_size=2, max_tokens=10, max_len=10, world_size=3, rank=r) for r in range(3)]
    mbs = [ld.micro_batches(0, 0) for ld in loaders]
    assert [len(m) for m in mbs] == [1, 1, 1]
    empty = [m[0] for m in mbs if m[0].n_seqs == 0]
    assert len(empty) == 1 and empty[0].input_ids.tolist() == [[99]] and len(empty[0].loss_index) == 0


# -----------------------------------------------------------------------------
# Toy corpus


def test_toy_corpus_refuses_more_problems_than_it_has(tmp_path):
    with pytest.raises(D.DataError, match="distinct problems.*ask for fewer"):
        D.toy_corpus(tmp_path, n_train=min(D.TOY_PROBLEMS.values()) // 2, n_test=10)


def test_toy_corpus_is_deterministic_and_well_formed(tmp_path, toy):
    D.toy_corpus(tmp_path / "again", n_train=300, n_test=20, seed=3)
    for name in ("raw/train-00000-of-00001.parquet", "test.jsonl", "model/tokenizer.json", "model/config.json"):
        assert (tmp_path / "again" / name).read_bytes() == (toy / name).read_bytes(), name
    test = [json.loads(line) for line in (toy / "test.jsonl").read_text().splitlines()]
    assert len(test) == 20 and set(test[0]) == {"id", "problem", "answer"}
    train = pq.read_table(toy / "raw" / "train-00000-of-00001.parquet").to_pylist()
    assert not {t["problem"] for t in test} & {r["problem"] for r in train}  # held out
    assert D.raw_layout(toy / "raw" / "train-00000-of-00001.parquet")[0] == "struct"
    labels = [(l, m) for r in train for l, m in zip(r["correctness"]["llama_verification"],
                                                     r["correctness"]["math_verify_reparsed_answer"])]
    correct = sum(l and m for l, m in labels)
    assert 0.6 < correct / len(labels) < 0.95  # a mix of correct and incorrect traces
    misses = {"sums": [], "products": []}  # the teacher errs on products only, off by a carry
    for r in train:
        kind = "products" if "\\times" in r["problem"] else "sums"
        misses[kind] += [abs(int(re.search(r"boxed\{(\d+)\}", g)[1]) - int(r["answer"])) for g in r["generations"]]
    assert set(misses["sums"]) == {0} and set(misses["products"]) == {0, 10, 100}
    assert 0.3 < misses["products"].count(0) / len(misses["products"]) < 0.8
    for r in train[:50]:
        for g in r["generations"]:
            assert g.startswith("<think>\n") and "</think>" in g and "\\boxed{" in g
    tok = D.load_tokenizer(toy / "model")
    config = M.Qwen2Config.from_pretrained(toy / "model")
    assert tok.get_vocab_size() <= config.vocab_size
    text = D.prompt_text(train[0]["problem"]) + train[0]["generations"][0] + D.IM_END
    ids = tok.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert ids.count(tok.token_to_id(D.IM_START)) == 3 and ids[-1] == tok.token_to_id(D.IM_END)


def test_toy_corpus_writes_only_into_a_new_empty_or_earlier_toy_directory(tmp_path):
    mine = tmp_path / "mine"
    (mine / "model").mkdir(parents=True)
    (mine / "test.jsonl").write_text("precious\n")
    (mine / "model" / "tokenizer.json").write_text("{}")
    with pytest.raises(SystemExit, match=r"mine: exists and is not a directory we wrote \(no TOY\).*--out"):
        D.main(["toy", "--out", str(mine), "--n-train", "20", "--n-test", "2"])
    assert (mine / "test.jsonl").read_text() == "precious\n" and (mine / "model" / "tokenizer.json").read_text() == "{}"
    D.main(["toy", "--out", str(tmp_path / "toy"), "--n-train", "20", "--n-test", "2"])
    D.main(["toy", "--out", str(tmp_path / "toy"), "--n-train", "20", "--n-test", "3"])  # an earlier toy: rewritten
    assert len((tmp_path / "toy" / "test.jsonl").read_text().splitlines()) == 3
