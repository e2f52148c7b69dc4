import subprocess
import sys

HEAVY = ["tensorflow_datasets", "orbax", "sentencepiece", "grain", "tensorflow", "matplotlib"]


def test_import_lm_core_is_light():
    code = (f"import sys, lm_core; heavy = [m for m in {HEAVY!r} if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
