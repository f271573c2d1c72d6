"""`xenpv` turns what a command raises into one line and an exit status, never a traceback."""
from __future__ import annotations

import argparse

import pytest

from xenpv.harness import cli
from xenpv.stack.timescale import HarnessTooSlow


def _raising(monkeypatch: pytest.MonkeyPatch, exc: BaseException) -> None:
    def func(args: argparse.Namespace) -> int:
        raise exc

    parser = argparse.ArgumentParser()
    parser.add_argument("-v", "--verbose", action="count", default=0)
    parser.set_defaults(func=func)
    monkeypatch.setattr(cli, "build_parser", lambda: parser)


def test_a_model_deadline_in_the_harness_process_is_one_line(monkeypatch: pytest.MonkeyPatch,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    """The harness's own vCPU (qtest, trap link) raises the model's HarnessTooSlow, a BaseException."""
    _raising(monkeypatch, HarnessTooSlow("no reply from QEMU to 'inb 0x1f7'", 10.0))
    assert cli.main([]) == 1
    err = capsys.readouterr().err
    assert err.startswith("xenpv: harness too slow") and "XENPV_TIME_SCALE" in err and "Traceback" not in err
