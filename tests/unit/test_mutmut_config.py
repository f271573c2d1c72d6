"""ci/mutmut_config.py's classification of mutants that cannot change a rule (issue 18): what it skips must
really be equivalent, and what it keeps must run."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]

SOURCE = '''\
def f(payload):
    if not payload:
        raise XsError("EINVAL", "empty")
    if payload == b"x":
        raise XsError("EACCES", "no")
    raise ValueError("EINVAL", "other")
'''


def _config() -> ModuleType:
    spec = importlib.util.spec_from_file_location("mutmut_config_under_test", ROOT / "ci" / "mutmut_config.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_xserror_einval_mutated_to_an_unknown_name_is_skipped_as_its_fallback(tmp_path: Path) -> None:
    """XsError sends any name outside xsd_errors[] as EINVAL (backends/xenstored/errors.py), so
    XsError("XXEINVALXX") is XsError("EINVAL"); the message text next to it is skipped as before."""
    source = tmp_path / "mod.py"
    source.write_text(SOURCE)
    config = _config()
    lines = SOURCE.splitlines()

    def why(n: int, mutated: str) -> str | None:
        return config.classify(str(source), n, lines[n], mutated)

    assert why(2, '        raise XsError("XXEINVALXX", "empty")') == "fallback errno name"
    assert why(2, '        raise XsError("EINVAL", "XXemptyXX")') == "error message text"
    # Another name is a different errno on the wire, and another exception has no such fallback: they run.
    assert why(4, '        raise XsError("XXEACCESXX", "no")') is None
    assert why(5, '    raise ValueError("XXEINVALXX", "other")') is None
