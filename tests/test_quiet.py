"""What dbnb.core.quiet silences: the exact library lines, through the real logging machinery."""
import logging
import os
import subprocess
import sys
import textwrap

import pytest

from dbnb.core import quiet


@pytest.fixture
def silenced():
    quiet.library_noise()
    yield
    for name in quiet.NOISE:  # leave the loggers as other tests expect them
        logger = logging.getLogger(name)
        logger.filters = [f for f in logger.filters if not isinstance(f, quiet._Drop)]


@pytest.mark.parametrize("name, message, args", [
    ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make "
     "sure you already `pip install kernels` and the kernels >= 0.11.1", ("not in the local cache",)),
    ("kernels._internals.hf_hub", "Skipping publisher trust check for 'kernels-community/quantization-bitsandbytes' "
     "because Hugging Face Hub is in offline mode.", ()),
    ("transformers.tokenization_utils_base", "Token indices sequence length is longer than the specified maximum "
     "sequence length for this model (%d > %d). Running this sequence through the model will result in "
     "indexing errors", (93, 77)),
])
def test_the_library_lines_are_dropped_and_their_loggers_other_warnings_kept(silenced, caplog, name, message, args):
    caplog.set_level(logging.WARNING)
    logger = logging.getLogger(name)
    logger.warning(message, *args)
    logger.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records if r.name == name] == ["something else went wrong"]


def test_importing_bitsandbytes_after_library_noise_prints_neither_line(tmp_path):
    """The real import, in a fresh process as `dbnb` runs: what reaches the loggers is counted,
    so the test says whether this machine prints the lines at all (a CPU with AVX-512 BF16)."""
    pytest.importorskip("bitsandbytes")
    script = textwrap.dedent("""
        import logging
        from dbnb.core.quiet import library_noise
        seen = []
        for name in ("bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"):
            logging.getLogger(name).addFilter(lambda record: seen.append(record.getMessage()) or True)
        library_noise()
        import bitsandbytes
        print("SEEN", sum(("gemm_4bit_forward" in m or "publisher trust" in m) for m in seen))
    """)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if "SEEN 0" in done.stdout:
        pytest.skip("bitsandbytes prints neither line on this machine (no CPU kernel to fetch)")
    assert "gemm_4bit_forward" not in done.stderr and "publisher trust check" not in done.stderr, done.stderr
