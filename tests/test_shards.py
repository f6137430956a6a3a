"""The token shard format (llm.c layout) and the Shards reader."""
import numpy as np
import pytest
import torch

from trainer.data import HEADER_BYTES, MAGIC, Shards, open_shard, token_dtype, write_shard


def raw_header(path):
    return np.frombuffer(path.read_bytes()[:HEADER_BYTES], dtype="<i4")


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(200_000) == np.uint32


@pytest.mark.parametrize("dtype, version", [(np.uint16, 1), (np.uint32, 2)])
def test_round_trip_and_header(tmp_path, dtype, version):
    high = 65535 if dtype == np.uint16 else 200_000
    tokens = np.random.default_rng(0).integers(0, high + 1, size=1000).astype(dtype)
    path = tmp_path / "s.bin"
    write_shard(path, tokens)

    header = raw_header(path)
    assert header[0] == MAGIC == 20240520
    assert header[1] == version
    assert header[2] == 1000
    assert not header[3:].any()
    assert path.stat().st_size == 1024 + np.dtype(dtype).itemsize * 1000
    # tokens follow the header little-endian, byte for byte
    assert path.read_bytes()[1024:] == tokens.astype(np.dtype(dtype).newbyteorder("<")).tobytes()

    mm = open_shard(path)
    assert mm.dtype == dtype
    np.testing.assert_array_equal(mm, tokens)
    with pytest.raises(ValueError):
        mm[0] = 1  # read-only
    assert not list(tmp_path.glob("*.tmp"))


def test_write_rejects_other_dtypes(tmp_path):
    with pytest.raises(TypeError):
        write_shard(tmp_path / "s.bin", np.arange(10, dtype=np.int64))


def test_empty_shard(tmp_path):
    write_shard(tmp_path / "e.bin", np.zeros(0, dtype=np.uint16))
    assert len(open_shard(tmp_path / "e.bin")) == 0


def corrupt(path, offset, value):
    data = bytearray(path.read_bytes())
    data[offset:offset + 4] = np.int32(value).tobytes()
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, message", [
    (lambda p: corrupt(p, 0, 12345), "magic"),
    (lambda p: corrupt(p, 4, 7), "version"),
    (lambda p: corrupt(p, 8, 101), "bytes"),  # count disagrees with size
    (lambda p: p.write_bytes(p.read_bytes()[:-3]), "bytes"),  # truncated tokens
    (lambda p: p.write_bytes(p.read_bytes() + b"\0\0"), "bytes"),  # trailing garbage
    (lambda p: p.write_bytes(p.read_bytes()[:500]), "header"),  # truncated header
    (lambda p: corrupt(p, 4, 2), "bytes"),  # uint32 claimed for uint16 data
])
def test_bad_shards_raise_naming_the_file(tmp_path, damage, message):
    path = tmp_path / "broken_shard.bin"
    write_shard(path, np.arange(100, dtype=np.uint16))
    damage(path)
    with pytest.raises(ValueError) as err:
        open_shard(path)
    text = str(err.value)
    assert "broken_shard.bin" in text and message in text and "re-run the shard stage" in text


def test_missing_shard(tmp_path):
    with pytest.raises(ValueError, match="nope.bin"):
        open_shard(tmp_path / "nope.bin")


@pytest.fixture
def three_shards(tmp_path):
    """Shards of distinct, consecutive ids, so a window tells where it came from."""
    paths = [tmp_path / f"{i}.bin" for i in range(3)]
    write_shard(paths[0], np.arange(0, 1000, dtype=np.uint16))
    write_shard(paths[1], np.arange(5000, 5010, dtype=np.uint16))  # too short for T=16
    write_shard(paths[2], np.arange(10000, 13000, dtype=np.uint16))
    return paths


def test_sequential_windows(three_shards):
    shards = Shards(three_shards)
    windows = list(shards.sequential_windows(16))
    # 1000 tokens -> starts 0,16,...,976 need token start+16 <= 999: 62 windows; 10 -> 0; 3000 -> 187
    assert len(windows) == 62 + 0 + 187
    xs = torch.stack([x for x, _ in windows])
    ys = torch.stack([y for _, y in windows])
    assert torch.equal(ys, xs + 1)
    expected_starts = list(range(0, 62 * 16, 16)) + list(range(10000, 10000 + 187 * 16, 16))
    assert xs[:, 0].tolist() == expected_starts
    # non-overlapping and contiguous: x windows tile each shard's prefix exactly
    assert torch.equal(xs[:62].flatten(), torch.arange(0, 62 * 16))
    # deterministic
    again = torch.stack([x for x, _ in shards.sequential_windows(16)])
    assert torch.equal(xs, again)

    limited = list(shards.sequential_windows(16, max_tokens=100))
    assert len(limited) == 6  # 6 * 16 = 96 <= 100 < 112
    assert torch.equal(torch.stack([x for x, _ in limited]), xs[:6])


def test_no_shards():
    with pytest.raises(ValueError, match="shard"):
        Shards([])
