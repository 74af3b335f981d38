"""An engine's loop ends with its owner: normally, on an exception, and when the daemon
cannot start serving."""

import socket
import threading

import pytest
from rich.console import Console

from lorag.errors import Unavailable
from lorag.server.daemon import ServeOptions, serve
from lorag.server.engine import EngineConfig, SamplingParams


def engine_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "lorag-engine" and t.is_alive()]


def test_an_exception_in_the_owner_stops_the_engine_and_its_requests(make_engine):
    engine = make_engine(start=False)
    before = len(engine_threads())
    with pytest.raises(RuntimeError, match="the owner failed"), engine:
        stream = engine.submit([1, 2, 3], SamplingParams(max_tokens=100, ignore_eos=True))
        next(iter(stream))  # the loop is stepping
        assert len(engine_threads()) == before + 1
        raise RuntimeError("the owner failed")
    assert not engine.alive and len(engine_threads()) == before
    assert stream.result().finish_reason == "cancelled"  # ended, not left hanging
    with pytest.raises(Unavailable, match="shut down"):
        engine.submit([1, 2, 3])
    engine.shutdown()  # a second shutdown is harmless


@pytest.mark.slow
def test_a_daemon_that_cannot_serve_stops_its_engine(tiny_base, tmp_path):
    """The gRPC port is taken: serve() fails after the engine started, and leaves no
    loop stepping behind it."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        options = ServeOptions(model=str(tiny_base), quantize="none", dtype="float32",
                               host="127.0.0.1", port=0, grpc_port=port,
                               data_dir=tmp_path, engine=EngineConfig(max_num_seqs=4))
        before = len(engine_threads())
        with pytest.raises(RuntimeError, match="cannot listen for gRPC"):
            serve(options, Console(quiet=True))
    assert len(engine_threads()) == before


def test_the_loop_uses_the_intra_op_threads_its_creator_set(make_engine):
    """OpenMP keeps the thread count per thread: the loop takes the creator's."""
    import torch

    def omp_threads() -> str:
        info = torch.__config__.parallel_info()
        return next(line for line in info.splitlines() if "omp_get_max_threads" in line)

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        engine = make_engine()
        assert engine._between_steps(omp_threads).endswith(": 1")
    finally:
        torch.set_num_threads(before)
