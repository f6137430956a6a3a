"""Bootstrap, standard library only: `python3 -m flows demo` / `python3 -m flows test`.

Creates .venv, installs the project (torch first, from its pinned CPU wheel, so pip
never pulls CUDA packages), then runs `c2m ARGS...` or the test suite in it. Installs
again only when pyproject.toml changed.
"""
import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("C2M_VENV", ROOT / ".venv"))
BIN = VENV / "bin"
STAMP = VENV / ".c2m-installed"
TORCH = "torch==2.13.0"


def sh(*argv: str) -> None:
    print("+", " ".join(argv), flush=True)
    subprocess.run(argv, check=True)


def ensure_venv() -> None:
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.is_file() and STAMP.read_text() == want:
        return
    if not (BIN / "python").exists():
        sh(sys.executable, "-m", "venv", str(VENV))
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet"]
    sh(*pip, TORCH)
    sh(*pip, "-e", f"{ROOT}[test]")
    STAMP.write_text(want)


def main() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"error: Python 3.11 or newer is needed (this is {sys.version.split()[0]})")
    args = sys.argv[1:] or ["--help"]
    try:
        ensure_venv()
    except subprocess.CalledProcessError as exc:  # pip said why above; exit 1 like c2m
        sys.exit(f"error: setting up {VENV} failed: `{' '.join(map(str, exc.cmd))}` exited "
                 f"{exc.returncode} (see above); fix that and run this command again")
    except KeyboardInterrupt:
        sys.exit(130)
    os.chdir(ROOT)
    if args[0] == "test":
        argv = [str(BIN / "python"), "-m", "pytest", *args[1:]]
    else:
        argv = [str(BIN / "c2m"), *args]
    os.execv(argv[0], argv)


if __name__ == "__main__":
    main()
