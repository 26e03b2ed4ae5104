"""Training data: tokenizer ids and round trip, packing, seeded order, exact resume, process slices, errors."""

import json
import os
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from tokenizers import Tokenizer, models

from nemojax import chat
from nemojax.errors import ConfigError, DataError
from nemojax.train import corpus, data
from nemojax.train.tokenizer import (
    NAMED_SPECIAL_IDS,
    load_tokenizer,
    save_tokenizer,
    special_tokens,
    train_tokenizer,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS_ID = NAMED_SPECIAL_IDS["</s>"]
WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _write_text_corpus(directory, num_files=6):
    """Small deterministic text files (different lengths, so rows straddle documents)."""
    directory.mkdir()
    for i in range(num_files):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {WORDS[(i + j) % len(WORDS)]!r}\n" for j in range(8 + 5 * i)]
        (directory / f"part{i}.txt").write_text("".join(lines))
    return directory


def _files_config(paths, **overrides):
    cfg = data.default_data_config()
    cfg.source = "files"
    cfg.paths = tuple(str(p) for p in paths)
    cfg.vocab_size = 300
    cfg.heldout_fraction = 0.2
    cfg.update(overrides)
    return cfg


@pytest.fixture(scope="module")
def text_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("text")
    cfg = _files_config([_write_text_corpus(root / "corpus")])
    tokenizer = data.build_tokenizer(cfg, str(root / "work"))
    return cfg, tokenizer


def _batches(cfg, tokenizer, steps, **kwargs):
    iterator = data.TokenBatches(cfg, tokenizer, **{"batch_size": 4, "seq_len": 16, "seed": 3, **kwargs})
    return [next(iterator) for _ in range(steps)]


def test_tokenizer_special_ids_and_round_trip(tmp_path):
    texts = ["print('héllo, wörld')  # 🙂\n\tindent\n" * 3, "x = [1, 2, 3]\r\n"]
    tokenizer = train_tokenizer(texts, 300)
    assert tokenizer.get_vocab_size() <= 300
    assert [tokenizer.token_to_id(t) for t in special_tokens()] == list(range(16))
    for token, token_id in NAMED_SPECIAL_IDS.items():
        assert tokenizer.encode(token, add_special_tokens=False).ids == [token_id]
    unseen = "Ünïcödé never seen: 你好 ∑ \x00 \n\n  end"
    for text in texts + [unseen]:
        assert tokenizer.decode(tokenizer.encode(text).ids) == text
    chat_text = chat.render_messages([{"role": "user", "content": "hi"}])
    assert tokenizer.decode(tokenizer.encode(chat_text).ids, skip_special_tokens=False) == chat_text
    reloaded = load_tokenizer(save_tokenizer(tokenizer, str(tmp_path)))
    assert reloaded.to_str() == tokenizer.to_str()
    assert load_tokenizer(str(tmp_path)).encode(unseen).ids == tokenizer.encode(unseen).ids


def test_load_tokenizer_errors(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_tokenizer(str(tmp_path / "missing.json"))
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read tokenizer"):
        load_tokenizer(str(tmp_path))
    without_chat = Tokenizer(models.WordLevel({"a": 0, "</s>": 1}, unk_token="a"))
    without_chat.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(DataError, match=re.escape("has no <|im_start|> token")):
        load_tokenizer(str(tmp_path))


def test_build_tokenizer_trains_once_then_reuses(tmp_path, text_setup):
    cfg, _ = text_setup
    first = data.build_tokenizer(cfg, str(tmp_path))
    assert (tmp_path / "tokenizer.json").exists()
    assert data.build_tokenizer(cfg, str(tmp_path)).to_str() == first.to_str()
    other = tmp_path / "other"
    save_tokenizer(train_tokenizer(["zzz yyy"], 280), str(other))
    cfg_with_path = _files_config(cfg.paths, tokenizer_path=str(other / "tokenizer.json"))
    assert data.build_tokenizer(cfg_with_path, str(tmp_path)).get_vocab_size() < first.get_vocab_size()


def test_packing_shapes_targets_and_full_coverage(text_setup):
    cfg, tokenizer = text_setup
    train, _ = data._split(cfg)
    stream, _, _ = data.tokenize_documents(train, tokenizer)
    assert (stream == EOS_ID).sum() == len(train)
    iterator = data.TokenBatches(cfg, tokenizer, batch_size=1, seq_len=16, seed=0)
    num_rows = iterator.num_rows
    assert num_rows == -(-(len(stream) - 1) // 16)
    epoch = data.TokenBatches(cfg, tokenizer, batch_size=num_rows, seq_len=16, seed=0)
    batch = next(epoch)
    assert batch["inputs"].shape == batch["targets"].shape == batch["loss_mask"].shape == (num_rows, 16)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32 and batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
    # Every row of the stream appears exactly once per epoch, and only padding is untrained.
    padded = np.concatenate([stream, np.full(num_rows * 16 + 1 - len(stream), EOS_ID)])
    expected_rows = np.stack([padded[r * 16 : r * 16 + 17] for r in range(num_rows)])
    got_rows = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    assert sorted(map(tuple, got_rows.tolist())) == sorted(map(tuple, expected_rows.tolist()))
    assert batch["loss_mask"].sum() == len(stream) - 1


def test_order_is_deterministic_from_the_seed(text_setup):
    cfg, tokenizer = text_setup
    first, again = _batches(cfg, tokenizer, 5), _batches(cfg, tokenizer, 5)
    other_seed = _batches(cfg, tokenizer, 5, seed=4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    assert any(not np.array_equal(a["inputs"], c["inputs"]) for a, c in zip(first, other_seed, strict=True))


def test_state_restore_resumes_exactly_across_epochs(text_setup):
    cfg, tokenizer = text_setup
    kwargs = {"batch_size": 5, "seq_len": 16, "seed": 7}
    uninterrupted = data.TokenBatches(cfg, tokenizer, **kwargs)
    steps = 2 * uninterrupted.num_rows // 5 + 3  # runs into a third epoch
    expected = [next(uninterrupted) for _ in range(steps)]
    interrupted = data.TokenBatches(cfg, tokenizer, **kwargs)
    for _ in range(steps // 2):
        next(interrupted)
    saved = json.loads(json.dumps(interrupted.state()))
    resumed = data.TokenBatches(cfg, tokenizer, **kwargs)
    resumed.restore(saved)
    assert saved["epoch"] >= 1
    for want in expected[steps // 2 :]:
        got = next(resumed)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    with pytest.raises(DataError, match="data changed"):
        resumed.restore({**saved, "num_rows": saved["num_rows"] + 1})


@pytest.mark.parametrize("shards", [1, 2])
def test_process_slices_split_the_global_batch(text_setup, shards):
    cfg, tokenizer = text_setup
    cfg = ml_collections.ConfigDict(dict(cfg.to_dict(), shards=shards))
    whole = _batches(cfg, tokenizer, 9, batch_size=6)
    halves = [_batches(cfg, tokenizer, 9, batch_size=6, process_index=p, process_count=2) for p in range(2)]
    for step, batch in enumerate(whole):
        for key in batch:
            assert halves[0][step][key].shape[0] == 3
            joined = np.concatenate([halves[0][step][key], halves[1][step][key]])
            np.testing.assert_array_equal(joined, batch[key])


def test_each_process_tokenises_only_its_shards(text_setup, monkeypatch):
    """Default shards (one per process): process p tokenises exactly the documents of shard p, the shards
    partition the train split, and a resumed iterator continues exactly (the state is process-free)."""
    cfg, tokenizer = text_setup
    train, _ = data._split(cfg)
    seen = []
    original = data.tokenize_documents

    def spy(documents, tok):
        seen.append({doc.key for doc in documents})
        return original(documents, tok)

    monkeypatch.setattr(data, "tokenize_documents", spy)
    data._STREAM_CACHE.clear()
    for p in range(2):
        seen.clear()
        data.TokenBatches(cfg, tokenizer, batch_size=4, seq_len=16, seed=0, process_index=p, process_count=2)
        assert seen == [{doc.key for doc in train if data.shard_of(doc.key, 2) == p}]
    shard_keys = [{doc.key for doc in train if data.shard_of(doc.key, 2) == p} for p in range(2)]
    assert shard_keys[0] and shard_keys[1] and shard_keys[0] | shard_keys[1] == {doc.key for doc in train}
    kwargs = dict(batch_size=4, seq_len=16, seed=5, process_index=1, process_count=2)
    uninterrupted = data.TokenBatches(cfg, tokenizer, **kwargs)
    expected = [next(uninterrupted) for _ in range(2 * uninterrupted.num_rows // 2 + 3)]  # into a third epoch
    interrupted = data.TokenBatches(cfg, tokenizer, **kwargs)
    for _ in range(5):
        next(interrupted)
    resumed = data.TokenBatches(cfg, tokenizer, **kwargs)
    resumed.restore(json.loads(json.dumps(interrupted.state())))
    for want in expected[5:]:
        np.testing.assert_array_equal(next(resumed)["inputs"], want["inputs"])
    with pytest.raises(ConfigError, match="data.shards"):
        data.num_shards(dict(cfg, shards=4), "train", 6, 2)  # 4 shards do not divide a batch of 6


def test_heldout_is_fixed_disjoint_and_padded(text_setup):
    cfg, tokenizer = text_setup
    train, heldout = data._split(cfg)
    assert heldout and not {d.key for d in train} & {d.key for d in heldout}
    full = data.heldout_batches(cfg, tokenizer, batch_size=4, seq_len=16)
    heldout_pass = data.TokenBatches(cfg, tokenizer, batch_size=4, seq_len=16, seed=99, split="heldout")
    seeded = list(heldout_pass)
    assert len(full) == len(seeded) == -(-heldout_pass.num_rows // 4) > 1
    for a, b in zip(full, seeded, strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])
    stream, _, _ = data.tokenize_documents(heldout, tokenizer)
    assert sum(b["loss_mask"].sum() for b in full) == len(stream) - 1
    assert len(data.heldout_batches(cfg, tokenizer, batch_size=4, seq_len=16, num_batches=1)) == 1


CHATS = [
    {"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": f"<think>ok</think>{w}!"}]}
    for w in WORDS
] + [
    {
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "One?"},
            {"role": "assistant", "content": "<think>count</think>1"},
            {"role": "user", "content": "Two?"},
            {"role": "assistant", "content": "2, then\n  more text"},
        ]
    }
]


def test_chat_mask_covers_exactly_the_assistant_tokens(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in CHATS) + "\n")
    cfg = _files_config([path], heldout_fraction=0.0)
    data.validate_data_config(cfg)
    tokenizer = data.build_tokenizer(cfg, str(tmp_path / "work"))
    documents, _ = data._split(cfg)
    tokens, mask, _ = data.tokenize_documents(documents, tokenizer)
    whole = [tokenizer.encode(doc.text, add_special_tokens=False).ids + [EOS_ID] for doc in documents]
    assert tokens.tolist() == [token for ids in whole for token in ids]
    trained_text = "".join(text for doc in documents for text, trained in doc.segments if trained)
    assert tokenizer.decode(tokens[mask == 1].tolist(), skip_special_tokens=False) == trained_text
    untrained_text = tokenizer.decode(tokens[mask == 0].tolist(), skip_special_tokens=False)
    assert "Say alpha." in untrained_text and "alpha!" not in untrained_text and "count" not in trained_text
    batch = next(data.TokenBatches(cfg, tokenizer, batch_size=1, seq_len=len(tokens) - 1, seed=0))
    np.testing.assert_array_equal(batch["targets"][0], tokens[1:])
    np.testing.assert_array_equal(batch["loss_mask"][0], mask[1:])


def _stdlib_files_in_a_new_process(max_bytes: int, cwd) -> list[str]:
    """corpus.stdlib_files in another interpreter, with another hash seed and working directory."""
    code = f"import json; from nemojax.train import corpus; print(json.dumps(corpus.stdlib_files({max_bytes})))"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]))
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


def test_stdlib_default_is_deterministic_and_split(tmp_path):
    cfg = data.default_data_config()
    cfg.max_corpus_bytes = 150_000
    cfg.vocab_size = 400
    data.validate_data_config(cfg)
    files = corpus.stdlib_files(150_000)
    assert files == sorted(files) and files == _stdlib_files_in_a_new_process(150_000, tmp_path)
    assert all(f.endswith(".py") and "site-packages" not in f for f in files)
    assert 0 < sum(os.path.getsize(os.path.join(corpus.stdlib_root(), f)) for f in files) <= 150_000
    train, heldout = data._split(cfg)
    assert train and heldout and len(train) + len(heldout) == len(files)
    assert train[0].text.strip() and train[0].key.startswith("stdlib/")
    tokenizer = data.build_tokenizer(cfg, str(tmp_path))
    batch = next(data.TokenBatches(cfg, tokenizer, batch_size=2, seq_len=32, seed=0))
    assert batch["inputs"].shape == (2, 32) and batch["loss_mask"].min() == 1.0


def test_single_text_file_is_split_by_lines(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20)))
    train, heldout = data._split(_files_config([path], heldout_fraction=0.25))
    assert train[0].text + heldout[0].text == path.read_text()
    assert heldout[0].text.startswith("line 15\n")


def test_split_and_shards_do_not_depend_on_where_the_corpus_lives(tmp_path):
    """The same corpus under two mount points (a directory, a glob, listed files) gives the same document
    names, so the held-out split and every process's shard agree across hosts."""
    first = _write_text_corpus(tmp_path / "here", num_files=8)
    (tmp_path / "elsewhere").mkdir()
    second = _write_text_corpus(tmp_path / "elsewhere" / "mounted", num_files=8)
    listings = [[str(first)], [str(second)], [str(second / "*.txt")], sorted(str(p) for p in second.iterdir())]
    splits = [data._split(_files_config(paths)) for paths in listings]
    names = [([doc.key for doc in train], [doc.key for doc in heldout]) for train, heldout in splits]
    assert all(entry == names[0] for entry in names) and names[0][1]
    assert {data.shard_of(key, 2) for key in names[0][0]} == {0, 1}


def test_errors_name_the_full_path_of_a_bad_record(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": 3}\n')
    with pytest.raises(DataError, match=re.escape(f"{tmp_path / 'bad.jsonl'}:2")):
        corpus.load_documents("files", [str(tmp_path)], "auto", 0)


def test_auto_format_reads_text_jsonl_and_chat(tmp_path):
    (tmp_path / "a.txt").write_text("plain words\n")
    (tmp_path / "b.jsonl").write_text('{"text": "from jsonl"}\n\n{"text": "second"}\n')
    (tmp_path / "c.jsonl").write_text(json.dumps(CHATS[0]) + "\n")
    documents = corpus.load_documents("files", [str(tmp_path / "*")], "auto", 0)
    assert [d.key for d in documents] == ["a.txt", "b.jsonl:1", "b.jsonl:3", "c.jsonl:1"]
    assert documents[1].text == "from jsonl"
    assert documents[3].segments == tuple(chat.render_segments(CHATS[0]["messages"]))


@pytest.mark.parametrize(
    ("files", "overrides", "needle"),
    [
        ({}, {"paths": ("{tmp}/missing.txt",)}, "data path not found: .*missing.txt"),
        ({}, {"paths": ("{tmp}/*.jsonl",)}, "matches no files"),
        ({"bad.jsonl": '{"text": "ok"}\n{"text": "ok"}\n{"text": oops}\n'}, {}, r"bad.jsonl:3: not valid JSON"),
        ({"bad.jsonl": '{"text": "ok"}\n{"txt": "no"}\n'}, {}, r"bad.jsonl:2: expected an object with a string 'text'"),
        ({"bad.jsonl": '{"messages": []}\n{"messages": [{"role": "bot", "content": "x"}]}\n'}, {}, "jsonl:2: .*bot"),
        ({"bad.txt": b"\xff\xfe not utf-8"}, {}, "not UTF-8 text: .*bad.txt"),
        ({"a.txt": "x\ny\n"}, {"format": "xml"}, "data.format must be one of"),
        ({"a.txt": "x\ny\n"}, {"source": "web"}, "data.source must be one of"),
        ({"a.txt": "x\ny\n"}, {"source": "stdlib"}, "data.source is 'stdlib'"),
        ({"a.txt": "x\ny\n"}, {"heldout_fraction": 1.5}, "heldout_fraction"),
        ({"a.txt": "x\ny\n"}, {"tokenizer_path": "{tmp}/nope.json"}, "tokenizer_path not found"),
        ({}, {"source": "files", "paths": ()}, "data.paths is empty"),
        ({"a.txt": "x\ny\n"}, {"vocab_size": 100}, "vocab_size must be at least 272"),
    ],
)
def test_validate_data_config_errors(tmp_path, files, overrides, needle):
    for name, content in files.items():
        target = tmp_path / name
        target.write_bytes(content) if isinstance(content, bytes) else target.write_text(content)
    cfg = _files_config(list(tmp_path.iterdir()))
    for key, value in overrides.items():
        if isinstance(value, tuple):
            value = tuple(v.format(tmp=tmp_path) for v in value)
        cfg[key] = value.format(tmp=tmp_path) if isinstance(value, str) else value
    with pytest.raises(DataError, match=needle):
        data.validate_data_config(cfg)


def test_unreadable_file_raises_data_error(tmp_path, monkeypatch):
    path = tmp_path / "locked.txt"
    path.write_text("secret")

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(corpus, "open", refuse, raising=False)
    with pytest.raises(DataError, match="cannot read data file .*locked.txt: Permission denied"):
        data.validate_data_config(_files_config([path]))


def test_packed_chats_carry_document_ids_and_no_target_crosses_a_document(tmp_path):
    """With data.document_masking each row's `segments` change exactly after each chat's `</s>`, the
    target that starts the next chat is not trained, and every other target keeps its assistant mask."""
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(json.dumps(record) for record in CHATS) + "\n")
    cfg = _files_config([path], heldout_fraction=0.0, document_masking=True)
    data.validate_data_config(cfg)
    tokenizer = data.build_tokenizer(cfg, str(tmp_path / "work"))
    documents, _ = data._split(cfg)
    tokens, mask, ids = data.tokenize_documents(documents, tokenizer)
    ends = np.flatnonzero(tokens == EOS_ID)
    assert len(ends) == len(documents) and ids.min() == 1
    np.testing.assert_array_equal(np.flatnonzero(np.diff(ids)), ends[:-1])  # a new id right after each `</s>`
    batch = next(data.TokenBatches(cfg, tokenizer, batch_size=1, seq_len=len(tokens) - 1, seed=0))
    np.testing.assert_array_equal(batch["segments"][0], ids[:-1])
    crossing = ids[1:] != ids[:-1]
    assert crossing.sum() == len(documents) - 1
    np.testing.assert_array_equal(batch["loss_mask"][0], np.where(crossing, 0.0, mask[1:]))
    plain = next(data.TokenBatches(_files_config([path], heldout_fraction=0.0), tokenizer, batch_size=1,
                                   seq_len=len(tokens) - 1, seed=0))
    assert "segments" not in plain
    with pytest.raises(DataError, match="document_masking"):
        data.validate_data_config(dict(_files_config([path]).to_dict(), document_masking="yes"))
