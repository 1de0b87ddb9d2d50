"""The tensor-parallel wire format: round trips of what rank 0 sends its workers, and malformed messages refused."""

import struct

import pytest
import torch

import giants
from giants.inference import wire
from giants.inference.tp_model import ShardSpec


def test_round_trip_of_a_shard_spec_with_tensors_and_plain_values():
    cfg = giants.get_config("tiny-gpt-oss")
    states = [{"layers.0.attn.q_proj.weight": torch.randn(4, 3)}, {"embed.weight": torch.arange(6).view(2, 3)}]
    spec = ShardSpec("state", None, cfg, 2, torch.bfloat16, 7, None, None, states=states)
    msg = (1, 2, 29500, spec, 1234, "cpu", 1, 60.0, True, {"stats": [1, 2.5, "x", None]})
    got = wire.loads(wire.dumps(msg))
    assert got[:3] == [1, 2, 29500] and got[4:9] == [1234, "cpu", 1, 60.0, True]
    assert got[9] == {"stats": [1, 2.5, "x", None]}
    s = got[3]
    assert isinstance(s, ShardSpec) and s.cfg == cfg and s.dtype is torch.bfloat16 and s.seed == 7
    for a, b in zip(s.states, states):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _msg(header: bytes) -> bytes:
    return struct.pack("<Q", len(header)) + header


@pytest.mark.parametrize("buf,match", [
    (b"\x01", "shorter than its 8-byte header"),
    (struct.pack("<Q", 99) + b"{}", "runs past"),
    (_msg(b"{x}"), "not JSON"),
    (_msg(b'{"__import__": "os.system"}'), "unknown tag"),
    (_msg(b'{"__dtype__": "object"}'), "unknown dtype"),
])
def test_malformed_messages_are_refused(buf, match):
    with pytest.raises(wire.WireError, match=match):
        wire.loads(buf)


def test_arbitrary_objects_are_not_sent():
    with pytest.raises(wire.WireError, match="cannot send a object"):
        wire.dumps(object())
