import json
import pickle

import numpy as np
import pytest

from lr_lightning.data.token_files import TokenFile, cache_key, token_dtype, write_token_file


def test_written_ids_read_back_through_the_memory_map(tmp_path):
    batches = [[1, 2, 3], [], [255, 0], list(range(100))]
    written = write_token_file(tmp_path / "train.bin", iter(batches), vocab_size=256, description={"split": "train"})
    opened = TokenFile.open(tmp_path / "train.bin")
    expected = [i for batch in batches for i in batch]
    assert isinstance(opened.array, np.memmap) and opened.dtype == np.uint16
    assert opened.array.tolist() == written.array.tolist() == expected and len(opened) == len(expected)
    meta = json.loads((tmp_path / "train.json").read_text())
    assert meta["count"] == len(expected) and meta["dtype"] == "uint16" and meta["split"] == "train"
    assert (tmp_path / "train.bin").stat().st_size == 2 * len(expected)


def test_ids_beyond_16_bits_are_stored_as_uint32(tmp_path):
    assert token_dtype(65_536) == np.uint16 and token_dtype(65_537) == np.uint32
    write_token_file(tmp_path / "val.bin", [[70_000, 3]], vocab_size=70_001)
    opened = TokenFile.open(tmp_path / "val.bin")
    assert opened.dtype == np.uint32 and opened.array.tolist() == [70_000, 3]


def test_an_interrupted_write_leaves_nothing_a_later_run_trusts(tmp_path):
    def batches_then_crash():
        yield [1, 2, 3]
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_token_file(tmp_path / "train.bin", batches_then_crash(), vocab_size=256)
    assert list(tmp_path.iterdir()) == []
    assert TokenFile.open(tmp_path / "train.bin") is None


def test_a_bin_without_matching_metadata_is_not_trusted(tmp_path):
    path = tmp_path / "train.bin"
    write_token_file(path, [[1, 2, 3, 4]], vocab_size=256)
    (tmp_path / "train.json").unlink()
    assert TokenFile.open(path) is None
    write_token_file(path, [[1, 2, 3, 4]], vocab_size=256)
    with open(path, "ab") as file:  # a .bin longer than its metadata says
        file.write(b"\0\0")
    assert TokenFile.open(path) is None


def test_an_id_outside_the_vocabulary_is_an_error(tmp_path):
    with pytest.raises(ValueError, match=r"outside \[0, 256\)"):
        write_token_file(tmp_path / "train.bin", [[5, 256]], vocab_size=256)
    assert TokenFile.open(tmp_path / "train.bin") is None


def test_pickling_a_token_file_does_not_copy_its_tokens(tmp_path):
    tokens = write_token_file(tmp_path / "train.bin", [list(range(200)) * 500], vocab_size=256)
    _ = tokens.array
    payload = pickle.dumps(tokens)
    assert len(payload) < 1_000
    assert pickle.loads(payload).array[:5].tolist() == [0, 1, 2, 3, 4]


def test_cache_key_ignores_key_order_and_sees_every_value():
    assert cache_key({"a": 1, "b": [2, 3]}) == cache_key({"b": [2, 3], "a": 1})
    assert cache_key({"a": 1, "b": [2, 3]}) != cache_key({"a": 1, "b": [3, 2]})
    assert len(cache_key({})) == 16
